"""Many server replicas on Ray Serve (issue 25)."""
