"""Deployment: inventory of cores, the plan of servers, and the launchers that run it."""
