# Sourced by bench scripts: `start_registry DIR` serves a docker-registry
# on a free loopback port with its storage in DIR/registry, sets RPORT
# (its port) and REG (its pid), and returns once it accepts connections.
# The caller ends it (`kill "$REG"`) in its own cleanup.
start_registry() {
  local dir=$1
  RPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  cat > "$dir/registry.yml" <<YML
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $dir/registry
http:
  addr: 127.0.0.1:$RPORT
YML
  docker-registry serve "$dir/registry.yml" > "$dir/registry.log" 2>&1 &
  REG=$!
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$RPORT") 2>/dev/null && return 0; sleep 0.1; done
  echo "error: docker-registry did not listen (see $dir/registry.log)" >&2
  return 1
}
