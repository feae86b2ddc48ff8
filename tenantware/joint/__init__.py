"""One decision before the upstream: the quota reservation and the seat request together.

On a single Redis server (``store.single_node``: one script reaches every key) the quota
layer reserves the request's limits and asks its seat pool for a seat in one script call,
the seat asked for only when every limit granted. Elsewhere (memory, Redis Cluster) each
layer makes its own call, as before. ``store.py`` declares what the quota layer asks of it;
``redis.py`` composes the script from the two layers' own scripts when it is loaded.
"""
