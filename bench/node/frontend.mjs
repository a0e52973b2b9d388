// The reference frontend: Socket.IO on the Redis adapter. A client joins one
// room at a time with `room`; messages reach it through Redis pub/sub.
import { createServer } from "node:http";
import { Server } from "socket.io";
import { createAdapter } from "@socket.io/redis-adapter";
import { createClient } from "redis";
import { config } from "./config.mjs";

const { host, port, redisUrl } = config(9100);

const pubClient = createClient({ url: redisUrl });
const subClient = pubClient.duplicate();
pubClient.on("error", (err) => console.error("redis:", err.message));
subClient.on("error", (err) => console.error("redis:", err.message));
await Promise.all([pubClient.connect(), subClient.connect()]);

const httpServer = createServer((req, res) => {
  if (req.method === "GET" && req.url === "/front/status") {
    const redis = pubClient.isReady && subClient.isReady ? "up" : "down";
    res.writeHead(redis === "up" ? 200 : 503, { "content-type": "application/json" });
    res.end(JSON.stringify({ status: "ok", redis }));
  } else {
    res.writeHead(404).end();
  }
});

const io = new Server(httpServer, {
  path: "/front/socket.io",
  transports: ["polling", "websocket"],
  adapter: createAdapter(pubClient, subClient),
});

io.on("connection", (socket) => {
  socket.on("room", (room, ack) => {
    if (typeof ack !== "function") return;
    if (typeof room !== "string" || room === "") return ack({ ok: false, error: "room must be a non-empty string" });
    for (const joined of socket.rooms) {
      if (joined !== socket.id && joined !== room) socket.leave(joined);
    }
    socket.join(room);
    ack({ ok: true, room });
  });
});

httpServer.listen(port, host, () => console.log(`frontend listening on ${host}:${port}`));

process.on("SIGTERM", () => {
  io.close();
  Promise.allSettled([pubClient.quit(), subClient.quit()]).then(() => process.exit(0));
});
