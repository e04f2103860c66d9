#!/usr/bin/env bash
# An SSH server on 127.0.0.1 only (port IONFLOW_TEST_SSH_PORT, default 2222; keys only), for the tests
# of reference calculations through AiiDA with the core.ssh transport. Idempotent; leaves port 22 and
# the system's sshd_config alone; adds no keys (a test authorises its own). Run as root.
set -euo pipefail
port="${IONFLOW_TEST_SSH_PORT:-2222}"
# another port (IONFLOW_TEST_SSH_PORT) gets files of its own, so two such servers can run side by side
suffix=""
[ "$port" = 2222 ] || suffix="-${port}"
config="/etc/ssh/ionflow_sshd_config${suffix}"
pidfile="/run/sshd-ionflow${suffix}.pid"
log="/var/log/ionflow-sshd${suffix}.log"

die() {
  echo "start-sshd.sh: $*" >&2
  exit 1
}

# The first line a server on the port sends: "SSH-2.0-..." for an SSH server, empty when nothing listens.
banner() {
  (exec 3<>"/dev/tcp/127.0.0.1/${port}" && IFS= read -r -t 2 line <&3 && printf '%s' "${line%$'\r'}") 2>/dev/null || true
}

[ "$(id -u)" = 0 ] || die "must run as root"
if ! [ -x /usr/sbin/sshd ]; then
  apt_log="$(mktemp)"
  if ! { apt-get -o DPkg::Lock::Timeout=600 update -qq && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq openssh-server; } >"$apt_log" 2>&1; then
    tail -n 20 "$apt_log" >&2
    die "could not install openssh-server with apt-get"
  fi
  rm -f "$apt_log"
fi
ssh-keygen -A >/dev/null
mkdir -p /run/sshd /root/.ssh
chmod 700 /root/.ssh

first="$(banner)"
case "$first" in
  SSH-*) echo "sshd: 127.0.0.1:${port} (already running)"; exit 0 ;;
  "") ;;
  *) die "127.0.0.1:${port} is taken by something that is not an SSH server (it said: ${first})" ;;
esac

cat > "$config.new" <<CONF
# written by ionflow's scripts/start-sshd.sh: for tests, 127.0.0.1 only
ListenAddress 127.0.0.1
Port ${port}
PidFile ${pidfile}
HostKey /etc/ssh/ssh_host_ed25519_key
HostKey /etc/ssh/ssh_host_ecdsa_key
HostKey /etc/ssh/ssh_host_rsa_key
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
AuthorizedKeysFile .ssh/authorized_keys
PermitRootLogin prohibit-password
UsePAM no
MaxStartups 100:30:200
Subsystem sftp internal-sftp
CONF
mv "$config.new" "$config"
/usr/sbin/sshd -t -f "$config" || die "sshd rejects $config"
: >"$log"
# sshd goes to the background before it binds the port: a failure to bind shows only in its log.
/usr/sbin/sshd -f "$config" -E "$log" || true
for _ in $(seq 40); do
  case "$(banner)" in SSH-*) echo "sshd: 127.0.0.1:${port} (pid $(cat "$pidfile" 2>/dev/null || echo '?'))"; exit 0 ;; esac
  grep -q -E 'fatal|Cannot bind|error' "$log" 2>/dev/null && break
  sleep 0.25
done
tail -n 5 "$log" >&2 2>/dev/null || true
die "sshd did not start on 127.0.0.1:${port} (log: $log)"
