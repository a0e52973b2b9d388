// The reference backend: express; POST /back/message emits `message` to the
// room through the Redis emitter.
import { randomUUID } from "node:crypto";
import express from "express";
import { Emitter } from "@socket.io/redis-emitter";
import { createClient } from "redis";
import { config } from "./config.mjs";

const { host, port, redisUrl } = config(9200);

const redisClient = createClient({ url: redisUrl });
redisClient.on("error", (err) => console.error("redis:", err.message));
await redisClient.connect();
const emitter = new Emitter(redisClient);

const app = express();
app.use(express.json());

app.get("/back/status", (req, res) => {
  const redis = redisClient.isReady ? "up" : "down";
  res.status(redis === "up" ? 200 : 503).json({ status: "ok", redis });
});

app.post("/back/message", (req, res) => {
  const { room, message } = req.body ?? {};
  if (typeof room !== "string" || room === "" || typeof message !== "string") {
    return res.status(400).json({ error: "room and message must be strings" });
  }
  const payload = { id: randomUUID(), room, message };
  emitter.to(room).emit("message", payload);
  res.status(201).json(payload);
});

const server = app.listen(port, host, () => console.log(`backend listening on ${host}:${port}`));

process.on("SIGTERM", () => {
  server.close();
  redisClient.quit().finally(() => process.exit(0));
});
