#!/usr/bin/env bash
# Local single-node Apache Kafka (KRaft) from jars resolved on Maven Central (see pom.xml).
#
#   deploy/kafka/kafka.sh resolve                 # mvn: copy the broker jars into deploy/kafka/lib
#   deploy/kafka/kafka.sh start PORT DATA_DIR     # format DATA_DIR if new, start, wait until it answers
#   deploy/kafka/kafka.sh stop DATA_DIR           # SIGTERM, wait for exit (SIGKILL after 30 s)
#   deploy/kafka/kafka.sh kill DATA_DIR           # SIGKILL (fault tests)
#
# Extra broker properties can be appended with KAFKA_EXTRA_PROPS="k=v\nk=v" (later keys win), and SCRAM
# credentials created at format time with KAFKA_SCRAM='SCRAM-SHA-256=[name=alice,password=secret]'.
# The controller listens on PORT+1. The data dir keeps the log, so a restart on it is durable.
#
# KAFKA_BUNDLE=DIR runs the broker from a bundle (deploy/kafka/bundle.py: a jlink'd Java runtime in DIR/jre and
# the jars in DIR/lib): no system Java, no Maven, no network (the GPU machine).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
lib="$here/lib"
java=java
if [ -n "${KAFKA_BUNDLE:-}" ]; then
  bundle="$(cd "$KAFKA_BUNDLE" && pwd)" || { echo "kafka.sh: KAFKA_BUNDLE=$KAFKA_BUNDLE is not a directory" >&2; exit 2; }
  lib="$bundle/lib"; java="$bundle/jre/bin/java"
  [ -x "$java" ] && [ -f "$lib/.resolved" ] || { echo "kafka.sh: $bundle is not a broker bundle (no jre/bin/java or lib/); build one with make broker-bundle" >&2; exit 2; }
fi

die() { echo "kafka.sh: $*" >&2; exit 2; }

resolve() {
  if [ -f "$lib/kafka_2.13-4.4.0.jar" ] && [ -f "$lib/.resolved" ]; then return 0; fi
  [ -z "${KAFKA_BUNDLE:-}" ] || die "the bundle $KAFKA_BUNDLE has no broker jars; rebuild it (make broker-bundle)"
  command -v mvn >/dev/null || die "Maven (mvn) is needed to resolve the Kafka jars; install it (apt-get install maven)."
  command -v java >/dev/null || die "Java 17+ is needed to run Kafka; install it (apt-get install openjdk-17-jre-headless)."
  rm -rf "$lib"
  (cd "$here" && mvn -q -B dependency:copy-dependencies -DoutputDirectory="$lib" -DincludeScope=runtime) \
    || die "Maven could not resolve org.apache.kafka:kafka_2.13 (see output above)."
  touch "$lib/.resolved"
}

start() {
  local port="${1:?usage: kafka.sh start PORT DATA_DIR}" data="${2:?usage: kafka.sh start PORT DATA_DIR}"
  resolve
  mkdir -p "$data"
  data="$(cd "$data" && pwd)"
  local cport=$((port + 1)) props="$data/server.properties"
  cat > "$props" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$cport
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$data/log
num.partitions=4
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=8
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=true
log.flush.interval.messages=9223372036854775807
PROPS
  if [ -n "${KAFKA_EXTRA_PROPS:-}" ]; then printf '%b\n' "$KAFKA_EXTRA_PROPS" >> "$props"; fi
  local cp="$lib/*"
  local jvm=(-Xms256m -Xmx768m -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true
             "-Dlog4j2.configurationFile=$here/log4j2.yaml")
  if [ ! -f "$data/log/meta.properties" ]; then
    local scram=()
    if [ -n "${KAFKA_SCRAM:-}" ]; then scram=(--add-scram "$KAFKA_SCRAM"); fi
    "$java" "${jvm[@]}" -cp "$cp" kafka.tools.StorageTool format -t "streamlabel-local-cluster0" \
      -c "$props" "${scram[@]}" >"$data/format.log" 2>&1 \
      || { cat "$data/format.log" >&2; die "formatting $data failed"; }
  fi
  # setsid: the broker gets its own process group, so fault tests can SIGKILL/SIGSTOP it alone.
  setsid "$java" "${jvm[@]}" -cp "$cp" kafka.Kafka "$props" >>"$data/broker.log" 2>&1 < /dev/null &
  echo $! > "$data/broker.pid"
  local deadline=$((SECONDS + 90))
  until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
    if ! kill -0 "$(cat "$data/broker.pid")" 2>/dev/null; then
      tail -30 "$data/broker.log" >&2; die "the broker exited during start-up (log: $data/broker.log)"
    fi
    [ $SECONDS -lt $deadline ] || die "the broker did not listen on $port within 90 s (log: $data/broker.log)"
    sleep 0.2
  done
  echo "kafka: listening on 127.0.0.1:$port (pid $(cat "$data/broker.pid"), data $data)"
}

stop() {
  local data="${1:?usage: kafka.sh stop DATA_DIR}" sig="${2:-TERM}"
  [ -f "$data/broker.pid" ] || { echo "kafka: no broker.pid in $data"; return 0; }
  local pid; pid="$(cat "$data/broker.pid")"
  kill -"$sig" "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + 30))
  while kill -0 "$pid" 2>/dev/null; do
    if [ $SECONDS -ge $deadline ]; then kill -KILL "$pid" 2>/dev/null || true; fi
    sleep 0.1
  done
  rm -f "$data/broker.pid"
  echo "kafka: stopped (pid $pid)"
}

cmd="${1:-}"; shift || true
case "$cmd" in
  resolve) resolve ;;
  start) start "$@" ;;
  stop) stop "$@" ;;
  kill) stop "${1:?usage: kafka.sh kill DATA_DIR}" KILL ;;
  *) die "usage: kafka.sh resolve | start PORT DATA_DIR | stop DATA_DIR | kill DATA_DIR" ;;
esac
