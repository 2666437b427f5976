"""Starting the real system on one machine: redis-server and the services on free ports.

Used by the integration tests, the benchmarks and `make run`.
"""
