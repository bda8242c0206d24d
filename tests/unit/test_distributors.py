"""download.distributor=pyspark / ray without its extra: a one-line error naming the extra, before the
run folder exists. The import is made to fail (``sys.modules[name] = None``); nothing is uninstalled."""

from __future__ import annotations

import sys

import pytest
import yaml

from kd3.cli import main
from kd3.data import distributors
from kd3.data.distributors import require
from kd3.errors import ConfigError


@pytest.mark.parametrize("distributor, module, extra", [("pyspark", "pyspark", "spark"), ("ray", "ray", "ray")])
def test_missing_extra_is_one_line_naming_it_before_the_folder_is_touched(tmp_path, monkeypatch, capsys,
                                                                           distributor, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    (tmp_path / "urls.txt").write_text("http://127.0.0.1:9/a.png\n")
    config = tmp_path / "crawl.yaml"
    config.write_text(yaml.safe_dump({"download": {"url_list": str(tmp_path / "urls.txt"),
                                                   "distributor": distributor}}))
    for extra_args in (["--dry-run"], []):
        assert main(["download", "--config", str(config), "--run-dir", str(tmp_path / "run"), *extra_args]) != 0
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert f"download.distributor={distributor} needs {module}" in err and f"pip install 'kd3[{extra}]'" in err
        assert str(config) in err
        assert not (tmp_path / "run").exists()


def test_multiprocessing_needs_no_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyspark", None)
    monkeypatch.setitem(sys.modules, "ray", None)
    require("multiprocessing", "x.yaml")  # img2dataset's own pool: nothing to import
    with pytest.raises(ConfigError, match=r"x\.yaml: download\.distributor=ray needs ray"):
        require("ray", "x.yaml")


def test_pyspark_without_java_is_refused_up_front(monkeypatch, tmp_path):
    pytest.importorskip("pyspark")
    monkeypatch.setenv("JAVA_HOME", str(tmp_path))  # no bin/java in it
    assert distributors.java() is None
    with pytest.raises(ConfigError, match="needs Java"):
        require("pyspark", "x.yaml")
