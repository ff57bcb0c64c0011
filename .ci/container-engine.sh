# Sourced by .ci/run: make a container engine answer for the compose end-to-end tests
# (tests/integration/compose/) and export what they need. With Docker
# present, nothing to do. Without it (our CI machines have no Docker engine and no image
# registry), ../shared/compose-lab sets up rootful podman + Docker Compose v2 + local
# stand-ins of the base images; its override file and healthcheck driver cover podman's
# differences, so the project's own files stay engine-neutral.

LAB="${COMPOSE_LAB_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/shared/compose-lab}"
export COMPOSE_E2E=required  # a CI run without an engine fails instead of skipping

engine_answers() {
  { docker compose ls >/dev/null 2>&1 || docker-compose ls >/dev/null 2>&1; }
}

if engine_answers; then
  echo "ci: a container engine answers; the compose tests use it"
elif [ -x "$LAB/setup.sh" ]; then
  echo "ci: no container engine; setting up $LAB (podman + Compose v2, ~5 min the first time)"
  # setup.sh writes each root filesystem to <name>.tar.tmp and mmdebstrap (1.3) picks the
  # output format from the file name: `.tmp` makes a directory, which `podman import`
  # rejects. Say the format explicitly.
  shims="$(mktemp -d)"
  printf '#!/bin/sh\nexec %s --format=tar "$@"\n' "$(command -v mmdebstrap || echo /usr/bin/mmdebstrap)" >"$shims/mmdebstrap"
  chmod 0755 "$shims/mmdebstrap"
  # setup.sh starts `podman system service` in the directory it is run from, and the conmon
  # it forks for each container needs that directory: a service an earlier run started in
  # a checkout deleted since still answers the API but starts no container ("write child:
  # broken pipe"; conmon: "Failed to get working directory"). So run setup.sh from /, and
  # stop such a service (by the pid file setup.sh wrote) so that it starts a fresh one.
  service_pid="$(cat "${TMPDIR:-/tmp}/compose-lab/podman-service.pid" 2>/dev/null || true)"
  if [ -n "$service_pid" ] && [[ "$(readlink "/proc/$service_pid/cwd" 2>/dev/null)" == *" (deleted)" ]]; then
    echo "ci: the podman service (pid $service_pid) runs in a deleted directory; starting a fresh one"
    kill "$service_pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$service_pid" 2>/dev/null || break; sleep 0.2; done
  fi
  # The project's folder: every python/nginx/redis tag its Dockerfiles and compose file
  # name gets a stand-in (a bumped base image needs no change in the lab).
  project="$PWD"
  (cd / && PATH="$shims:$PATH" bash "$LAB/setup.sh" "$project") >"${TMPDIR:-/tmp}/compose-lab-setup.log" 2>&1 || {
    tail -n 40 "${TMPDIR:-/tmp}/compose-lab-setup.log" >&2
    echo "ci: compose-lab setup failed (log above)" >&2
    exit 1
  }
  # Only docker-compose from the lab's bin/: it also holds a static nginx without
  # stub_status, which must not shadow the OS nginx the local cluster runs.
  lab_bin="$(mktemp -d)"
  ln -s "${TMPDIR:-/tmp}/compose-lab/bin/docker-compose" "$lab_bin/docker-compose"
  export PATH="$lab_bin:$PATH" DOCKER_HOST=unix:///run/podman/podman.sock
  export COMPOSE_BAKE=false DOCKER_BUILDKIT=0
  export COMPOSE_E2E_FILES="$LAB/docker-compose.podman.yml"
  export COMPOSE_E2E_HEALTHCHECK_DRIVER="HC_MAX_S=3600 $LAB/hc-driver.sh"
  engine_answers || { echo "ci: podman's Docker API does not answer after setup" >&2; exit 1; }
else
  echo "ci: no container engine and no compose-lab; the compose tests will fail (COMPOSE_E2E=required)" >&2
fi
