#!/bin/sh
# Configure Postfix from the environment, then run it in the foreground (logs on stdout).
# With --configure-only it writes the configuration (to $MAIL_CONFIG when set) and stops.
#
#   POSTFIX_HOSTNAME           myhostname                              (mx.example.test)
#   POSTFIX_DOMAIN             domain delivered here, to the catch-all (example.test)
#   POSTFIX_RELAYHOST          relay outgoing mail through this host   (empty: direct)
#   POSTFIX_MYNETWORKS         clients allowed to relay                (loopback)
#   POSTFIX_FILTER             milter | smtp | none                    (milter)
#   POSTFIX_FILTER_ADDRESS     sidecar HOST:PORT       (milter:8899; smtp mode: milter:10024)
#   POSTFIX_REINJECT_NETWORKS  smtp mode: who may re-inject on :10025, comma-separated
#                              (default: the private ranges)
#
# milter mode: every message passes the sidecar during the SMTP dialogue (smtpd_milters);
# if the sidecar cannot be reached, Postfix answers 4xx so the sender retries.
# smtp mode: queued mail goes through the sidecar's content filter and comes back on :10025.
set -eu

domain="${POSTFIX_DOMAIN:-example.test}"
mode="${POSTFIX_FILTER:-milter}"

postconf -e \
    "myhostname=${POSTFIX_HOSTNAME:-mx.example.test}" \
    "mydestination=\$myhostname, localhost, ${domain}" \
    "mynetworks=${POSTFIX_MYNETWORKS:-127.0.0.0/8 [::1]/128}" \
    "relayhost=${POSTFIX_RELAYHOST:-}" \
    "maillog_file=/dev/stdout" \
    "local_recipient_maps=" \
    "luser_relay=mailbox" \
    "home_mailbox=Maildir/" \
    "smtpd_relay_restrictions=permit_mynetworks, reject_unauth_destination"

case "$mode" in
milter)
    postconf -e \
        "smtpd_milters=inet:${POSTFIX_FILTER_ADDRESS:-milter:8899}" \
        "non_smtpd_milters=" \
        "milter_default_action=tempfail" \
        "milter_protocol=6"
    ;;
smtp)
    postconf -e "content_filter=phishgate:[${POSTFIX_FILTER_ADDRESS:-milter:10024}]" \
        "smtpd_milters="
    postconf -M "phishgate/unix=phishgate unix - - n - 10 smtp"
    postconf -P "phishgate/unix/smtp_send_xforward_command=yes" \
        "phishgate/unix/disable_mime_output_conversion=yes" \
        "phishgate/unix/disable_dns_lookups=yes"
    # Re-injection: no filter, no milter; its own cleanup holds what the sidecar marked
    # `X-Phishgate-Action: quarantine` (the hold queue is the quarantine).
    postconf -M "10025/inet=10025 inet n - n - 10 smtpd"
    postconf -P "10025/inet/content_filter=" \
        "10025/inet/receive_override_options=no_unknown_recipient_checks,no_milters" \
        "10025/inet/mynetworks=${POSTFIX_REINJECT_NETWORKS:-10.0.0.0/8,172.16.0.0/12,192.168.0.0/16}" \
        "10025/inet/smtpd_client_restrictions=permit_mynetworks,reject" \
        "10025/inet/smtpd_authorized_xforward_hosts=\$mynetworks" \
        "10025/inet/cleanup_service_name=phishgate-cleanup"
    config_dir="$(postconf -h config_directory)"
    printf '%s\n' '/^X-Phishgate-Action:[[:space:]]*quarantine/ HOLD held by phishgate' \
        >"${config_dir}/phishgate_hold"
    postconf -M "phishgate-cleanup/unix=phishgate-cleanup unix n - n - 0 cleanup"
    postconf -P "phishgate-cleanup/unix/header_checks=regexp:${config_dir}/phishgate_hold"
    ;;
none) ;;
*)
    echo "POSTFIX_FILTER must be milter, smtp or none, not '$mode'" >&2
    exit 78
    ;;
esac

if [ "${1:-}" = "--configure-only" ]; then
    exit 0
fi

# Files the chrooted daemons need (the Debian init script does this on a normal host).
for f in etc/resolv.conf etc/hosts etc/services; do
    if [ -f "/$f" ]; then
        mkdir -p "/var/spool/postfix/$(dirname "$f")"
        cp "/$f" "/var/spool/postfix/$f"
    fi
done
postfix check
exec postfix start-fg
