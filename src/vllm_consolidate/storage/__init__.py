"""Object storage (``s3://``, ``gs://``, ``az://``) as a source and a destination.

Layered like the rest: :mod:`.urls` parses and confines object URLs and keys (no I/O), :mod:`.store`
builds one client per bucket from the standard environment plus ``--storage-options`` (obstore, imported
only when an object URL is used, so local runs never pay for it). The reading side and the publishing
side build on these two: :mod:`.bytefile` is the one interface every input byte is read through (a local
file, or ranged GETs of an object), :mod:`.remote` mirrors an input prefix as local stand-ins so every
reader runs unchanged on it.

Why obstore: one maintained library (Rust ``object_store``) for S3, GCS and Azure, with concurrent
ranged GETs (``get_ranges``) that coalesce adjacent ranges, multipart PUT and retries with backoff
built in; the README's "Object storage" section has the measured comparison with ``s3fs``.
"""
