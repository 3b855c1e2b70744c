"""A Kafka broker that starts on a machine with no Java and no network (the GPU machine): a jlink'd minimal
Java runtime plus the broker jars, without other platforms' native code, in one .tar.xz.

    python deploy/kafka/bundle.py build DIR          # DIR/jre (jlink) + DIR/lib (the jars, this platform's natives)
    python deploy/kafka/bundle.py pack DIR TARBALL   # DIR → TARBALL (.tar.xz), with its size
    make broker-bundle                               # both: deploy/kafka/bundle/ and deploy/kafka/kafka-bundle.tar.xz

``KAFKA_BUNDLE=DIR deploy/kafka/kafka.sh start PORT DATA`` then runs the broker on ``DIR/jre/bin/java`` and
``DIR/lib``: no system Java, no Maven. Needs the JDK's ``jlink`` (Java 17+) and ``deploy/kafka/lib`` (``kafka.sh
resolve``) where it is built; the target machine needs only the same OS and CPU architecture (glibc Linux x86-64
here).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
LIB = HERE / "lib"

# What the broker (KRaft, PLAINTEXT or SASL/SCRAM, log4j2, JMX) uses of the JDK. Checked by starting it and
# running transactions (tests/integration/test_broker_bundle.py); jdeps cannot resolve these jars as modules.
MODULES = ["java.base", "java.desktop", "java.logging", "java.management", "java.naming", "java.security.jgss", "java.security.sasl",
           "java.xml", "jdk.crypto.ec", "jdk.management", "jdk.unsupported"]

# Native libraries sit under .../<os>/<arch>/ in the jars (zstd-jni, snappy-java, lz4-java); this platform's
# directory names for its CPU:
_ARCH = {"x86_64": {"amd64", "x86_64"}, "aarch64": {"aarch64", "arm64"}}
_NATIVE = (".so", ".dylib", ".dll", ".jnilib", ".a")


def _keeps(name: str) -> bool:
    """A jar entry is kept unless it is a native library for another OS or CPU than this one."""
    if not name.endswith(_NATIVE):
        return True
    parts = name.split("/")
    if len(parts) < 3:
        return True
    os_, arch = parts[-3].lower(), parts[-2].lower()
    return os_ == sys.platform and arch in _ARCH.get(platform.machine(), {platform.machine()})


def strip_jar(src: Path, dst: Path) -> tuple[int, int]:
    """Copy ``src`` without other platforms' native libraries; (entries dropped, bytes saved)."""
    dropped, saved = 0, 0
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            if _keeps(info.filename):  # stored, not deflated: the .tar.xz compresses raw classes far better
                data = zin.read(info.filename)
                info.compress_type = zipfile.ZIP_STORED
                zout.writestr(info, data)
            else:
                dropped += 1
                saved += info.compress_size
    return dropped, saved


def build(out: Path) -> None:
    jlink = shutil.which("jlink") or (Path(os.environ.get("JAVA_HOME", "")) / "bin" / "jlink")
    if not jlink or not Path(jlink).exists():
        sys.exit("bundle: the JDK's jlink is needed (apt-get install openjdk-17-jdk-headless)")
    if not (LIB / ".resolved").exists():
        subprocess.run([str(HERE / "kafka.sh"), "resolve"], check=True)
    t0 = time.monotonic()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    print(f"bundle: jlink {len(MODULES)} modules → {out / 'jre'}", flush=True)
    subprocess.run([str(jlink), "--add-modules", ",".join(MODULES), "--strip-debug", "--no-header-files",
                    "--no-man-pages", "--output", str(out / "jre")], check=True)
    (out / "lib").mkdir()
    dropped = saved = 0
    for jar in sorted(LIB.glob("*.jar")):
        d, s = strip_jar(jar, out / "lib" / jar.name)
        dropped, saved = dropped + d, saved + s
    (out / "lib" / ".resolved").touch()
    shutil.copy(HERE / "kafka.sh", out / "kafka.sh")
    shutil.copy(HERE / "log4j2.yaml", out / "log4j2.yaml")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"bundle: {out} ({size / 2**20:.1f} MiB; {dropped} native libraries of other platforms left out, "
          f"{saved / 2**20:.1f} MiB) in {time.monotonic() - t0:.0f} s", flush=True)


def pack(src: Path, tarball: Path) -> None:
    t0 = time.monotonic()
    tarball.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball, "w:xz", preset=9) as tar:
        tar.add(src, arcname="kafka-bundle")
    print(f"bundle: {tarball} ({tarball.stat().st_size / 2**20:.1f} MiB) in {time.monotonic() - t0:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("dir", type=Path)
    p = sub.add_parser("pack")
    p.add_argument("dir", type=Path)
    p.add_argument("tarball", type=Path)
    a = ap.parse_args()
    if a.cmd == "build":
        build(a.dir)
    else:
        pack(a.dir, a.tarball)


if __name__ == "__main__":
    main()
