# Sourced by docker/launch_*.sh: `run_torchrun <resume hint> torchrun ...` runs torchrun so that
# a stop request ends the run cleanly and is reported as a stop.
#
# torchrun runs in a session of its own, so a terminal's Ctrl-C, `docker stop` (SIGTERM to this
# script as PID 1) or a kill of this script reach only this script. It passes SIGINT / SIGTERM
# (SIGHUP as SIGTERM) on to the training processes, torchrun's children, once per signal
# received: they save a checkpoint at the next step boundary and exit 0 (mink-ssl does so under
# torchrun), torchrun ends normally, and this script exits 128 + signal (130, 143; 129 for
# SIGHUP) with the command to resume. Had torchrun itself received the signal, it would have
# forwarded it, killed the training processes after TORCH_ELASTIC_SHUTDOWN_TIMEOUT (30 s)
# whether or not their checkpoint was written, and ended with a traceback and exit 1.
# A second signal is passed on too: the training processes then abort at once.
# Under SLURM every process of the job step gets the scheduler's signal (torchrun too); see
# docker/slurm_pretrain.sbatch.

_stop_signal=""
_job=""

# the pids whose parent is $1
_children_of() {
  local f stat fields
  for f in /proc/[0-9]*/stat; do
    read -r stat 2>/dev/null < "$f" || continue
    read -r -a fields <<< "${stat##*) }"  # after "(command name)": state, ppid, ...
    if [[ ${fields[1]} == "$1" ]]; then f=${f#/proc/}; echo "${f%/stat}"; fi
  done
}

# torchrun's pid: the job itself (setsid replaced itself with torchrun), or its child when
# setsid had to fork (it does when it leads a process group, which a script's job does not)
_torchrun() {
  local child
  if [[ $(cat "/proc/${_job}/comm" 2>/dev/null) == setsid ]]; then
    child=$(_children_of "${_job}" | head -n 1)
    echo "${child:-${_job}}"
  else
    echo "${_job}"
  fi
}

_forward() {
  local sig=$1 as=$1 torchrun workers
  [[ ${sig} == HUP ]] && as=TERM
  _stop_signal=${_stop_signal:-${sig}}
  torchrun=$(_torchrun)
  workers=$(_children_of "${torchrun}")
  if [[ -z ${workers} ]]; then  # none started yet: torchrun ends the start itself
    kill -s "${as}" "${torchrun}" 2>/dev/null || true
    echo "launch: SIG${sig} before the training processes started: stopping torchrun" >&2
    return
  fi
  # shellcheck disable=SC2086  # one pid per word
  kill -s "${as}" ${workers} 2>/dev/null || true
  echo "launch: SIG${sig} passed on to the training processes (pids $(echo ${workers})): they" \
       "save a checkpoint at the next step boundary and stop; send it again to abort at once" >&2
}

# the command that resumes the run: `resume_command VAR=value ... -- script overrides...`,
# with resume=auto unless the overrides have it
resume_command() {
  local env=() arg
  while [[ $# -gt 0 && $1 != -- ]]; do env+=("$1"); shift; done
  shift
  for arg in "$@"; do [[ ${arg} == resume=auto ]] && { printf '%q ' "${env[@]}" "$@"; return; }
  done
  printf '%q ' "${env[@]}" "$@" resume=auto
}

run_torchrun() {
  local hint=$1 rc code
  shift
  setsid -w "$@" &
  _job=$!
  trap '_forward INT' INT
  trap '_forward TERM' TERM
  trap '_forward HUP' HUP
  # poll rather than block in `wait` on torchrun: bash's interruptible wait has a window in
  # which a trapped signal stays pending until the job it waits for exits (under heavy load a
  # SIGINT was never passed on and training ran to its end); after a foreground command the
  # trap runs at once, so a stop is passed on within a second. Bash reaps the job as it ends.
  while kill -0 "${_job}" 2>/dev/null; do
    sleep 1 || true  # a Ctrl-C reaches sleep too (same process group)
  done
  rc=0
  wait "${_job}" || rc=$?
  trap - INT TERM HUP
  if [[ -n ${_stop_signal} && ${rc} -eq 0 ]]; then
    code=$((128 + $(kill -l "${_stop_signal}")))
    echo "launch: stopped by SIG${_stop_signal} with a checkpoint (exit ${code}); resume with:" \
         "${hint}" >&2
    return "${code}"
  fi
  return "${rc}"
}
