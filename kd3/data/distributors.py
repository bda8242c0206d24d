"""img2dataset's ``pyspark`` and ``ray`` distributors, run as a local cluster on this machine only.

img2dataset's pyspark distributor uses the active SparkSession or creates one with 16 GB of driver
memory; its ray distributor calls ``ray.remote`` on whatever ``ray.init`` it finds, and without ray
installed it silently does nothing (the stage then ended with "finished 0/N shards"). kd3 instead

- checks before the stage folder is touched that the distributor's package is installed, and names
  the extra that installs it (:func:`require`);
- starts the cluster itself, inside img2dataset's child process group, as Spark local mode
  (``local[processes_count]``) or a one-node Ray, bound to 127.0.0.1, with no web UI / dashboard,
  Ray's usage reporting off, and scratch files in a temporary folder (:func:`local_cluster`).

Every worker is then a descendant of the stage's child process, so it inherits the crawl guard's
proxy variables (``http_proxy`` … set by the download stage) like the multiprocessing workers do:
Spark's Python workers are forked by a daemon the local JVM starts, Ray's workers by the local
raylet. A cluster on other machines would not inherit them, so a session that is not local mode is
refused rather than crawled unguarded.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from kd3.data.loopback import LOOPBACK
from kd3.errors import ConfigError, Kd3Error

log = logging.getLogger(__name__)

#: distributor → (the module it imports, the kd3 extra that installs it)
EXTRAS = {"pyspark": ("pyspark", "spark"), "ray": ("ray", "ray")}
#: log4j2 configuration for the Spark driver: errors only (its INFO/WARN start-up lines otherwise fill stderr)
_LOG4J = "rootLogger.level = error\nrootLogger.appenderRef.stderr.ref = console\n" \
         "appender.console.type = Console\nappender.console.name = console\nappender.console.target = SYSTEM_ERR\n" \
         "appender.console.layout.type = PatternLayout\nappender.console.layout.pattern = [spark] %p %c{1}: %m%n\n"


def require(distributor: str, source: str) -> None:
    """ConfigError naming the extra when ``distributor`` needs a package that does not import."""
    if distributor not in EXTRAS:
        return
    module, extra = EXTRAS[distributor]
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"{source}: download.distributor={distributor} needs {module}, which is not installed "
                          f"({exc}): pip install 'kd3[{extra}]', or use download.distributor=multiprocessing") from None
    if distributor == "pyspark" and java() is None:
        raise ConfigError(f"{source}: download.distributor=pyspark needs Java (17 or later for pyspark 4), found "
                          "neither $JAVA_HOME/bin/java nor java on PATH; install a JDK, or use "
                          "download.distributor=multiprocessing")


def java() -> str | None:
    """The java that pyspark will start (``$JAVA_HOME/bin/java``, else ``java`` on PATH), or None."""
    home = os.environ.get("JAVA_HOME")
    if home:
        candidate = Path(home) / "bin" / "java"
        return str(candidate) if candidate.is_file() else None
    return shutil.which("java")


@contextlib.contextmanager
def local_cluster(distributor: str, workers: int) -> Iterator[None]:
    """For the ``with`` block: a Spark local-mode session or a one-node Ray with ``workers`` slots,
    which img2dataset's distributor then uses; nothing for ``multiprocessing``. Call it in the process
    whose environment the workers must inherit (img2dataset's child)."""
    if distributor == "multiprocessing":
        yield
        return
    with tempfile.TemporaryDirectory(prefix=f"kd3-{distributor}-") as scratch:
        starter = _spark_session if distributor == "pyspark" else _ray_session
        with starter(workers, Path(scratch)):
            yield


@contextlib.contextmanager
def _spark_session(workers: int, scratch: Path) -> Iterator[None]:
    os.environ["SPARK_LOCAL_IP"] = LOOPBACK  # the address Spark itself picks for its services
    os.environ["PYSPARK_PYTHON"] = os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable  # this venv in the workers
    log4j = scratch / "log4j2.properties"
    log4j.write_text(_LOG4J)
    from pyspark.sql import SparkSession

    if SparkSession.getActiveSession() is not None:  # img2dataset would use it, wherever its workers are
        raise Kd3Error("download.distributor=pyspark: a Spark session is already active in this process; "
                       "kd3 starts its own local-mode session so that every worker goes through the crawl guard")
    spark = (SparkSession.builder.master(f"local[{workers}]").appName("kd3-download")
             .config("spark.driver.host", LOOPBACK).config("spark.driver.bindAddress", LOOPBACK)
             .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
             .config("spark.local.dir", str(scratch))
             # the JVM only pipes shards to the Python workers and collects their status: the quick
             # compiler and serial GC start it faster (one 24-URL toy download on 2 busy cores: 41 s → 32 s)
             .config("spark.driver.extraJavaOptions",
                     f"-Dlog4j2.configurationFile=file:{log4j} -Djava.io.tmpdir={scratch} "
                     "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC")
             .getOrCreate())
    try:
        master = spark.sparkContext.master
        if not master.startswith("local"):
            raise Kd3Error(f"download.distributor=pyspark: Spark started with master {master!r}, not local mode; "
                           "its executors would not go through the crawl guard (is PYSPARK_SUBMIT_ARGS set?)")
        spark.sparkContext.setLogLevel("ERROR")
        yield
    finally:
        spark.stop()


@contextlib.contextmanager
def _ray_session(workers: int, scratch: Path) -> Iterator[None]:
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # Ray otherwise reports usage to its servers
    # local Ray only: the node's address is then 127.0.0.1, not found by routing towards 8.8.8.8
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.pop("RAY_ADDRESS", None)  # never join a cluster elsewhere
    import ray

    if ray.is_initialized():
        raise Kd3Error("download.distributor=ray: Ray is already initialised in this process; kd3 starts its "
                       "own one-node Ray so that every worker goes through the crawl guard")
    ray.init(address="local", num_cpus=workers, include_dashboard=False, _node_ip_address=LOOPBACK,
             _temp_dir=str(scratch), log_to_driver=False, logging_level=logging.ERROR,
             object_store_memory=80 * 1024 * 1024)  # shard results are tiny; Ray's minimum is 75 MiB
    try:
        yield
    finally:
        ray.shutdown()
