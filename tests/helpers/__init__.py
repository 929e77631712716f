"""Test helpers: a fault-injecting KServe v2 server and a real-MLServer fixture (127.0.0.1 only)."""
