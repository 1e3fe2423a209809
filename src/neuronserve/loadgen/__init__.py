"""Load generation: closed and open loop clients, statistics and reports."""
