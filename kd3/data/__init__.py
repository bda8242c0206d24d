"""Data: image preprocessing, webdataset shards, manifests, the demo datasets and loopback server."""
