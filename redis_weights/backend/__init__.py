"""Redis itself: the deployment behind a client (``deployment/``), every key name (``keys``), what a
namespace owns (``index``), the namespace's store, decoding of values, bulk reads into buffers, and pub/sub."""
