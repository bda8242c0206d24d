"""read_url_list: uids become join keys and tar member names, so only plain keys are accepted."""

from __future__ import annotations

import pandas as pd
import pytest

from kd3.data.manifest import read_url_list, url_uid
from kd3.errors import Kd3Error


@pytest.mark.parametrize("uid", ["../../../../x", "has.dot", "/abs", "a b", ""])
def test_a_uid_column_with_a_path_like_value_is_refused_naming_the_row(tmp_path, uid):
    path = tmp_path / "urls.parquet"
    pd.DataFrame({"url": ["http://127.0.0.1/a.png", "http://127.0.0.1/b.png"], "uid": ["ok_1", uid]}).to_parquet(path)
    with pytest.raises(Kd3Error, match=r"urls\.parquet: uid .* \(row 1\) is not a plain sample key"):
        read_url_list(path)


def test_uids_derived_from_urls_are_plain_and_given_ones_kept(tmp_path):
    path = tmp_path / "urls.csv"
    pd.DataFrame({"url": ["http://127.0.0.1/a.png"], "uid": ["A-b_9"]}).to_csv(path, index=False)
    assert read_url_list(path).frame["uid"].tolist() == ["A-b_9"]
    assert url_uid("http://127.0.0.1/a.png") == "61f32a24e7ef434a6d77a909f4bdaf6f"  # sha256(url)[:32]
