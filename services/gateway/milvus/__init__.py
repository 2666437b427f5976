"""The gateway's index on Milvus (GATEWAY_INDEX_BACKEND=milvus): one collection per space.

filters.py: the boolean expressions searches and deletes send (built of digests: no caller's text ever
enters one); schema.py: a space's collection, its fields and rows; calls.py: pymilvus's blocking client, off
the event loop, within each call's deadline, its failures as the caller's status codes; backend.py: the
index calls on top of them.
"""
