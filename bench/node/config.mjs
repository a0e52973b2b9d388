// Where to listen and which Redis to use: --listen HOST:PORT and --redis URL,
// else $LISTEN and $REDIS_URL.
import { parseArgs } from "node:util";

export function config(defaultPort) {
  const { values } = parseArgs({
    options: {
      listen: { type: "string", default: process.env.LISTEN ?? `127.0.0.1:${defaultPort}` },
      redis: { type: "string", default: process.env.REDIS_URL ?? "redis://127.0.0.1:6379/0" },
    },
  });
  const at = values.listen.lastIndexOf(":");
  return {
    host: values.listen.slice(0, at).replace(/^\[|\]$/g, "") || "127.0.0.1",
    port: Number(values.listen.slice(at + 1)),
    redisUrl: values.redis,
  };
}
