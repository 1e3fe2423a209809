"""Monitoring: neuron-monitor and host metrics for Prometheus, dashboards, a live top view."""
