#!/usr/bin/env bash
# An SSH server on 127.0.0.1 only (port IONFLOW_TEST_SSH_PORT, default 2222; keys only), for the tests
# of reference calculations through AiiDA with the core.ssh transport. Idempotent; leaves port 22 and
# the system's sshd_config alone; adds no keys (a test authorises its own). Run as root.
set -euo pipefail
port="${IONFLOW_TEST_SSH_PORT:-2222}"
if ! [ -x /usr/sbin/sshd ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server >/dev/null
fi
ssh-keygen -A >/dev/null
mkdir -p /run/sshd /root/.ssh
chmod 700 /root/.ssh
config=/etc/ssh/ionflow_sshd_config
cat > "$config" <<CONF
# written by ionflow's scripts/start-sshd.sh: for tests, 127.0.0.1 only
ListenAddress 127.0.0.1
Port ${port}
PidFile /run/sshd-ionflow.pid
HostKey /etc/ssh/ssh_host_ed25519_key
HostKey /etc/ssh/ssh_host_rsa_key
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
UsePAM no
Subsystem sftp internal-sftp
CONF
if ! (exec 3<>"/dev/tcp/127.0.0.1/${port}") 2>/dev/null; then
  /usr/sbin/sshd -f "$config"
  for _ in $(seq 20); do (exec 3<>"/dev/tcp/127.0.0.1/${port}") 2>/dev/null && break; sleep 0.25; done
fi
(exec 3<>"/dev/tcp/127.0.0.1/${port}") 2>/dev/null || { echo "sshd did not start on 127.0.0.1:${port}" >&2; exit 1; }
echo "sshd: 127.0.0.1:${port}"
