import { readFileSync } from "node:fs";
import net from "node:net";

export interface ServerAddress {
  /** An IP address or a host name (looked up through the system resolver). */
  host: string;
  port: number;
  /** "host:port", or "[v6]:port", for messages. */
  label: string;
}

const DEFAULT_PORT = 53;

/** Parses "host", "host:port", "[v6]:port" or a bare IPv6 address. */
export function parseServer(spec: string): ServerAddress {
  const text = spec.trim();
  let host: string;
  let portText: string | undefined;
  const bracketed = /^\[([^\]]+)\](?::(\d+))?$/.exec(text);
  if (bracketed) {
    host = bracketed[1]!;
    portText = bracketed[2];
  } else if (text.split(":").length > 2) {
    host = text; // a bare IPv6 address cannot carry a port
  } else {
    const [h = "", p] = text.split(":");
    host = h;
    portText = p;
  }
  const port = portText === undefined ? DEFAULT_PORT : Number(portText);
  const hostOk = net.isIP(host) !== 0 || /^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$/i.test(host);
  if (
    !hostOk ||
    !Number.isInteger(port) ||
    port < 1 ||
    port > 65535 ||
    (portText !== undefined && !/^\d+$/.test(portText))
  ) {
    throw new Error(`invalid DNS server "${spec}": expected host[:port]`);
  }
  return { host, port, label: net.isIPv6(host) ? `[${host}]:${port}` : `${host}:${port}` };
}

/** Splits a DNS_SERVERS value ("10.0.0.2, 10.0.0.3:5353 [::1]:53") into its entries, validating each. */
export function parseServerList(value: string): string[] {
  const entries = value.split(/[\s,]+/).filter((s) => s !== "");
  for (const entry of entries) parseServer(entry);
  return entries;
}

/** The `nameserver` lines of resolv.conf; 127.0.0.1 when there are none, as glibc does. */
export function readResolvConf(path = "/etc/resolv.conf"): string[] {
  let text = "";
  try {
    text = readFileSync(path, "utf8");
  } catch {
    // no file: fall through to the default
  }
  const servers: string[] = [];
  for (const line of text.split("\n")) {
    const match = /^\s*nameserver\s+(\S+)/.exec(line);
    if (match && net.isIP(match[1]!.replace(/%.*$/, ""))) servers.push(match[1]!);
  }
  return servers.length > 0 ? servers : ["127.0.0.1"];
}
