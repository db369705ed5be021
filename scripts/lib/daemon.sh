# One daemon at a time for the device scripts that compare settings on fresh daemons
# (gpu_spec_edit, gpu_spec_noslowdown). Needs TS (the tokenspeed executable).
#   daemon_up LOG ARGS...          start `tokenspeed up ARGS`, logging to LOG; return once
#                                  `tokenspeed status` answers (at most 300 s) or it exited
#   daemon_down LABEL LOG ARGS...  stop it; print how long it ran and its log's errors

daemon_up() {
  local log=$1; shift
  DAEMON_STARTED=$(date +%s)
  "$TS" up "$@" > "$log" 2>&1 &
  DAEMON_PID=$!
  for _ in $(seq 1 300); do
    "$TS" status "$@" >/dev/null 2>&1 && break
    kill -0 "$DAEMON_PID" 2>/dev/null || break
    sleep 1
  done
}

daemon_down() {
  local label=$1 log=$2 rc; shift 2
  "$TS" down "$@" >/dev/null 2>&1 || kill "$DAEMON_PID"
  wait "$DAEMON_PID"; rc=$?
  echo "-- $label done after $(( $(date +%s) - DAEMON_STARTED )) s (daemon exit status $rc)"
  grep -E -A3 "Traceback|ERROR" "$log" | head -20
}
