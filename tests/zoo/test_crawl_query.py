"""A crawl list's caption and extra columns reach `kd3 query` by uid, from RUN/download/url_list.parquet."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pytest

from kd3.cli import main
from kd3.errors import Kd3Error
from kd3.inspect.query import join_url_columns


def test_join_url_columns_matches_on_uid_and_leaves_unknown_null():
    lookup = pa.table({"uid": ["a", "b", "c"], "TEXT": ["cat", "dog", "cow"], "similarity": [0.1, 0.2, 0.3]})
    batch = pa.record_batch({"uid": ["c", "x", "a"], "selected": [True, False, True]})
    joined = pa.Table.from_batches(list(join_url_columns([batch], lookup))).to_pydict()
    assert joined == {"uid": ["c", "x", "a"], "selected": [True, False, True], "TEXT": ["cow", None, "cat"],
                      "similarity": [0.3, None, 0.1]}
    with pytest.raises(Kd3Error, match="keep uid"):
        list(join_url_columns([pa.record_batch({"selected": [True]})], lookup))


@pytest.mark.slow
def test_query_adds_url_list_columns(toy_run, tmp_path):
    run_dir, _ = toy_run
    output = tmp_path / "rows.parquet"
    assert main(["query", "--run-dir", str(run_dir), "--epoch", "select", "--url-columns", "source,demo_label",
                 "--output", str(output)]) == 0
    rows = pd.read_parquet(output)
    truth = pd.read_parquet(run_dir / "download" / "url_list.parquet").set_index("uid")
    assert len(rows) > 0 and rows["source"].notna().all()
    assert (rows["source"].to_numpy() == truth.loc[rows["uid"], "source"].to_numpy()).all()
    assert (rows["demo_label"].to_numpy() == truth.loc[rows["uid"], "demo_label"].to_numpy()).all()
    assert main(["query", "--run-dir", str(run_dir), "--epoch", "select", "--url-columns", "nope"]) != 0
