import { describe, expect, it } from "vitest";
import { buildReceived, receivedProtocol, rfc5322Date } from "./received.ts";

const date = new Date("2025-11-23T17:47:05Z");
const base = {
  by: "mx.example.net",
  queueId: "01JD0000000000000000000000",
  ip: "192.0.2.1",
  helo: "client.example",
  esmtp: true,
  authenticated: false,
  recipients: ["user@example.net"],
  date,
};

describe("Received header", () => {
  it("names client, TLS, protocol, id, the one recipient and the date", () => {
    const h = buildReceived({
      ...base,
      hostname: "client.example",
      tls: { protocol: "TLSv1.3", cipher: "TLS_AES_256_GCM_SHA384" },
    });
    expect(h).toBe(
      "Received: from client.example (client.example [192.0.2.1])\r\n" +
        "\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384)\r\n" +
        "\tby mx.example.net (mailpipe) with ESMTPS id 01JD0000000000000000000000\r\n" +
        "\tfor <user@example.net>; Sun, 23 Nov 2025 17:47:05 +0000\r\n",
    );
  });

  it("leaves out `for` with several recipients and writes IPv6 literals", () => {
    const h = buildReceived({ ...base, ip: "2001:db8::1", recipients: ["a@x.test", "b@x.test"] });
    expect(h).toBe(
      "Received: from client.example ([IPv6:2001:db8::1])\r\n" +
        "\tby mx.example.net (mailpipe) with ESMTP id 01JD0000000000000000000000; Sun, 23 Nov 2025 17:47:05 +0000\r\n",
    );
  });

  it("hides the client's IP and HELO when asked (submission privacy)", () => {
    const h = buildReceived({
      ...base,
      authenticated: true,
      hideClient: true,
      tls: { protocol: "TLSv1.3", cipher: "TLS_AES_128_GCM_SHA256" },
    });
    expect(h).not.toContain("192.0.2.1");
    expect(h).not.toContain("client.example");
    expect(
      h.startsWith("Received: (using TLSv1.3 with cipher TLS_AES_128_GCM_SHA256)\r\n\tby mx.example.net"),
    ).toBe(true);
    expect(h).toContain("with ESMTPSA id");
  });

  it("names the authenticated user only when asked", () => {
    const h = buildReceived({
      ...base,
      authenticated: true,
      hideClient: true,
      authenticatedUser: "alice@example.net",
    });
    expect(h.startsWith("Received: (Authenticated sender: alice@example.net)\r\n\tby mx.example.net")).toBe(
      true,
    );
    expect(buildReceived({ ...base, authenticated: true, hideClient: true })).not.toContain("alice");
  });

  it("cannot be bent by a HELO holding comment or clause delimiters", () => {
    const h = buildReceived({ ...base, helo: "evil) by x.test (; for <a@b>" });
    expect(h.split("\r\n")[0]).toBe("Received: from evil__by_x.test____for__a@b_ ([192.0.2.1])");
  });

  it("uses RFC 3848 protocol names", () => {
    expect(receivedProtocol({ esmtp: false, tls: false, authenticated: false })).toBe("SMTP");
    expect(receivedProtocol({ esmtp: true, tls: false, authenticated: false })).toBe("ESMTP");
    expect(receivedProtocol({ esmtp: true, tls: true, authenticated: false })).toBe("ESMTPS");
    expect(receivedProtocol({ esmtp: true, tls: false, authenticated: true })).toBe("ESMTPA");
    expect(receivedProtocol({ esmtp: true, tls: true, authenticated: true })).toBe("ESMTPSA");
  });

  it("writes dates as RFC 5322 with a numeric zone", () => {
    expect(rfc5322Date(date)).toBe("Sun, 23 Nov 2025 17:47:05 +0000");
  });
});
