"""Apache Kafka's jars: fetched once from Maven Central (``org.apache.kafka:kafka_2.13``
and what it depends on) with Maven, into a cache directory; nothing is downloaded
from anywhere else. `KafkaCluster` runs them."""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

KAFKA_VERSION = "4.1.1"
SCALA_VERSION = "2.13"
# The slf4j 1.7 binding for log4j2, so a node's own log says why it stopped.
LOG4J_VERSION = "2.24.3"

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>tokenbus</groupId><artifactId>apache-kafka</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId><artifactId>kafka_{scala}</artifactId>
      <version>{kafka}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId>
      <version>{log4j}</version>
    </dependency>
  </dependencies>
</project>
"""

_LOG4J2 = """status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = warn
rootLogger.appenderRef.out.ref = out
logger.server.name = kafka.server.KafkaRaftServer
logger.server.level = info
"""


class KafkaStartError(RuntimeError):
    """Apache Kafka could not be fetched or started; the message says why."""


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "tokenbus"


def fetch(cache_dir: Path | None = None) -> Path:
    """The folder of Apache Kafka's jars, fetched with Maven on first use."""
    lib = (cache_dir or default_cache_dir()) / f"kafka_{SCALA_VERSION}-{KAFKA_VERSION}" / "lib"
    done = lib / ".complete"
    if done.exists():
        return lib
    if shutil.which("mvn") is None or shutil.which("java") is None:
        raise KafkaStartError(
            "Apache Kafka needs Java (17 or later) and Maven to fetch its jars: install them "
            "(Debian: apt-get install openjdk-17-jre-headless maven)"
        )
    with tempfile.TemporaryDirectory() as build:
        pom = Path(build) / "pom.xml"
        pom.write_text(_POM.format(scala=SCALA_VERSION, kafka=KAFKA_VERSION, log4j=LOG4J_VERSION))
        staging = lib.with_name("lib.partial")
        shutil.rmtree(staging, ignore_errors=True)
        result = subprocess.run(
            ["mvn", "-q", "-B", "-f", str(pom), "dependency:copy-dependencies",
             f"-DoutputDirectory={staging}", "-DincludeScope=runtime"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise KafkaStartError(
                f"Maven could not fetch Apache Kafka {KAFKA_VERSION}: "
                f"{(result.stdout + result.stderr).strip()[-2000:]}"
            )
    (staging / "log4j2.properties").write_text(_LOG4J2)
    shutil.rmtree(lib, ignore_errors=True)
    staging.rename(lib)
    done.touch()
    log.info("Apache Kafka %s fetched into %s", KAFKA_VERSION, lib)
    return lib
