"""Multi-instance serving: routing policies (shared by the simulator and the HTTP router)."""
