/**
 * URLs as they are safe to log: a password (`user:pass@`) or a token (`token@`, as NATS takes it)
 * before the host is masked; a bare user name followed by a password keeps the name.
 */
export function redactUrls(value: string): string {
  return value.replace(/([a-z][a-z0-9+.-]*:\/\/)([^/@\s,]*)@/gi, (_m, scheme: string, userinfo: string) => {
    const colon = userinfo.indexOf(":");
    return colon >= 0 ? `${scheme}${userinfo.slice(0, colon)}:[redacted]@` : `${scheme}[redacted]@`;
  });
}
