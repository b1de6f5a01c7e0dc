// mx-connect 2.0.0 ships no types: the part of its API this service uses.
declare module "mx-connect" {
  import type { Socket } from "node:net";

  export interface MxEntry {
    exchange: string;
    priority?: number;
    /** pre-resolved addresses: no DNS lookup happens for an entry that has some */
    A?: string[];
    AAAA?: string[];
  }

  export interface ConnectHookOptions {
    host: string;
    port: number;
    localAddress?: string;
    /** set by the hook to hand over a socket it connected itself (proxy, tunnel) */
    socket?: Socket;
  }

  export interface MxConnectOptions {
    /** domain or address the connection is for */
    target: string;
    mx?: MxEntry[];
    port?: number;
    /** per address, in ms */
    maxConnectTime?: number;
    localAddress?: string;
    localHostname?: string;
    dnsOptions?: {
      blockLocalAddresses?: boolean;
      blockReservedNetworks?: boolean;
      ignoreIPv6?: boolean;
      preferIPv6?: boolean;
      resolveRecords?: (domain: string, type: string) => unknown;
    };
    ignoreMXHosts?: string[];
    connectHook?: (
      delivery: unknown,
      options: ConnectHookOptions,
      done: (err?: Error | null) => void,
    ) => void;
    connectError?: (err: Error, delivery: unknown, options: ConnectHookOptions) => void;
    mtaSts?: { enabled?: boolean; logger?: (entry: Record<string, unknown>) => void; cache?: unknown };
    dane?: { enabled?: boolean; logger?: (entry: Record<string, unknown>) => void };
  }

  export interface MxConnection {
    socket: Socket;
    hostname: string;
    /** the address connected to */
    host: string;
    port: number;
    localAddress: string;
    localPort: number;
    /** DANE: TLS is mandatory on this connection */
    requireTls?: boolean;
  }

  /** what mx-connect rejects with: `code` is a socket error code or "InvalidIpAddress" */
  export interface MxConnectError extends Error {
    code?: string;
    category?: "network" | "dns" | "policy" | "dane";
    temporary?: boolean;
    response?: string;
  }

  export interface DaneTlsaRecord {
    usage: number;
    selector: number;
    mtype: number;
    cert: Buffer;
  }

  export interface DaneCheck {
    valid: boolean;
    matchedRecord: DaneTlsaRecord | null;
    error: string | null;
  }

  /** the module's DANE helpers (lib/dane.js), exported as mxConnect.dane */
  export interface DaneModule {
    verifyCertAgainstTlsa(
      cert: import("node:crypto").X509Certificate | undefined,
      records: DaneTlsaRecord[],
      chain?: import("node:crypto").X509Certificate[],
    ): DaneCheck;
  }

  function mxConnect(options: MxConnectOptions): Promise<MxConnection>;
  namespace mxConnect {
    const dane: DaneModule;
  }
  export default mxConnect;
}
