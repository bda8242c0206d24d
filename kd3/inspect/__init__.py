"""Inspecting selection manifests: summaries, plots, contact sheets, an HTML report, query and export.

Plain functions over parquet manifests and webdataset shards; the ``inspect`` stage and the
``query``/``export`` commands are thin wrappers. Everything streams: manifests are read a column
subset and a record batch at a time, shards a tar member at a time, so a million-row pool fits in a
few hundred MB. Nothing here imports torch.

- :mod:`.manifests`  find a run's manifests, pick label/confidence columns, stream record batches
- :mod:`.summary`    per-manifest counts, thresholds, α, churn, histograms → tables (text and HTML)
- :mod:`.truth`      the URL list's ground truth (in-domain flag, true class) joined on uid hashes
- :mod:`.plots`      matplotlib (Agg) PNGs: selection per class, τ_k, training curves, confidence
- :mod:`.tars`       stream samples out of tar shards, keeping only the wanted ones' bytes
- :mod:`.sheets`     per-class contact sheets of the most/least confident and near-miss samples
- :mod:`.report`     the static ``index.html`` and the whole ``RUN/inspect/`` build
- :mod:`.query`      filter manifests to CSV/parquet
- :mod:`.export`     reshard a filtered selection into new webdataset shards
"""
