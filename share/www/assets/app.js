// The chat page: one room, its history, live messages, and a box to send.
//
// The room is the last segment of the page's path (/front/<room>). Messages
// arrive two ways: the backend's history (GET /back/messages) and the
// frontend's Socket.IO `message` events. Both are merged by id, so a message
// is shown once and in id order however it arrived. On every (re)connect the
// page joins the room again, resuming after the last message it has (the
// frontend sends what was posted while it was away, then live messages); a
// page that has no message yet joins with the room's name and then reads the
// history.
//
// Test hooks are in the DOM only: #status[data-state] and li[data-id].
'use strict';

(function () {
  const ROOM_RE = /^[A-Za-z0-9_.-]{1,64}$/;
  const HISTORY_LIMIT = 200;
  const MAX_CHARS = 4000;
  const REQUEST_TIMEOUT_MS = 15000;
  const JOIN_TIMEOUT_MS = 5000;
  // Pause before joining again when the frontend cannot read the history yet.
  const JOIN_RETRY_MS = 1000;
  // Failed reconnection attempts after which the page says "offline".
  const OFFLINE_AFTER_ATTEMPTS = 5;

  const $ = (id) => document.getElementById(id);
  const els = {
    roomName: $('room-name'),
    status: $('status'),
    statusText: $('status-text'),
    retry: $('retry'),
    roomForm: $('room-form'),
    roomInput: $('room-input'),
    roomError: $('room-error'),
    historyError: $('history-error'),
    list: $('messages'),
    empty: $('empty'),
    jump: $('jump'),
    composer: $('composer'),
    text: $('composer-text'),
    send: $('send'),
    sendError: $('send-error'),
    counter: $('counter'),
  };

  // ---- the room -----------------------------------------------------------

  function roomFromPath(pathname) {
    const segment = pathname.replace(/\/+$/, '').split('/').pop() || '';
    try {
      return decodeURIComponent(segment);
    } catch (_) {
      return '';
    }
  }

  const room = roomFromPath(location.pathname);
  const params = new URLSearchParams(location.search);
  const forcePolling = params.get('transport') === 'polling';

  // ---- messages: ordered, deduplicated by id ------------------------------

  // Each entry: {ms, seq, id, el}, sorted by (ms, seq).
  const entries = [];
  const byId = new Map();
  const mine = new Set();

  function parseId(id) {
    const m = /^(\d+)-(\d+)$/.exec(String(id));
    if (!m) return null;
    // Stream ids fit well within 2^53 for milliseconds; compare as numbers.
    return { ms: Number(m[1]), seq: Number(m[2]) };
  }

  function compare(a, b) {
    return a.ms !== b.ms ? a.ms - b.ms : a.seq - b.seq;
  }

  // Where to resume after a reconnection: the newest id before which every
  // message of the room is shown. Messages from the socket arrive in order
  // and those of a history answer are its newest ones, so both move it; a
  // message this page sent is shown from the answer to its POST, possibly
  // before older ones arrive, so it does not.
  let resumeId = null;

  function advanceResume(id) {
    const key = parseId(id);
    if (key && (resumeId === null || compare(key, parseId(resumeId)) > 0)) resumeId = id;
  }

  const timeFormat = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit' });
  const dateTimeFormat = new Intl.DateTimeFormat(undefined, {
    weekday: 'short', day: 'numeric', month: 'short', hour: '2-digit', minute: '2-digit',
  });
  const fullFormat = new Intl.DateTimeFormat(undefined, { dateStyle: 'full', timeStyle: 'medium' });

  function formatTime(date) {
    const now = new Date();
    const sameDay = date.getFullYear() === now.getFullYear() &&
      date.getMonth() === now.getMonth() && date.getDate() === now.getDate();
    return sameDay ? timeFormat.format(date) : dateTimeFormat.format(date);
  }

  function renderMessage(msg, key) {
    const li = document.createElement('li');
    li.className = 'message';
    li.dataset.id = msg.id;
    const meta = document.createElement('p');
    meta.className = 'message-meta';
    const time = document.createElement('time');
    const ms = Number.isFinite(Number(msg.ts)) ? Number(msg.ts) : key.ms;
    const date = new Date(ms);
    time.dateTime = date.toISOString();
    time.title = fullFormat.format(date);
    time.textContent = formatTime(date);
    meta.appendChild(time);
    const text = document.createElement('p');
    text.className = 'message-text';
    text.textContent = String(msg.message);
    li.append(meta, text);
    return li;
  }

  function markMine(id) {
    mine.add(id);
    const entry = byId.get(id);
    if (entry && !entry.el.classList.contains('mine')) {
      entry.el.classList.add('mine');
      const who = document.createElement('span');
      who.className = 'message-who';
      who.textContent = 'You';
      entry.el.querySelector('.message-meta').prepend(who);
    }
  }

  // Adds the messages not shown yet, each in its place; returns how many.
  function merge(messages) {
    const stick = isNearBottom();
    let added = 0;
    for (const msg of messages) {
      if (!msg || typeof msg.id !== 'string' || msg.room !== room) continue;
      if (byId.has(msg.id)) continue;
      const key = parseId(msg.id);
      if (!key) continue;
      const entry = { ms: key.ms, seq: key.seq, id: msg.id, el: renderMessage(msg, key) };
      // Usually the newest: append. Otherwise find the first later entry.
      let at = entries.length;
      if (at > 0 && compare(entry, entries[at - 1]) < 0) {
        let lo = 0;
        let hi = entries.length - 1;
        while (lo < hi) {
          const mid = (lo + hi) >> 1;
          if (compare(entries[mid], entry) > 0) hi = mid; else lo = mid + 1;
        }
        at = lo;
      }
      if (at === entries.length) {
        els.list.appendChild(entry.el);
      } else {
        els.list.insertBefore(entry.el, entries[at].el);
      }
      entries.splice(at, 0, entry);
      byId.set(msg.id, entry);
      if (mine.has(msg.id)) markMine(msg.id);
      added += 1;
    }
    if (added > 0) {
      els.empty.hidden = true;
      if (stick) scrollToBottom(); else els.jump.hidden = false;
    }
    return added;
  }

  function isNearBottom() {
    const list = els.list;
    return list.scrollHeight - list.scrollTop - list.clientHeight < 80;
  }

  function scrollToBottom() {
    els.list.scrollTop = els.list.scrollHeight;
    els.jump.hidden = true;
  }

  els.list.addEventListener('scroll', () => {
    if (isNearBottom()) els.jump.hidden = true;
  });
  els.jump.addEventListener('click', () => {
    scrollToBottom();
    els.list.focus();
  });

  // ---- HTTP ---------------------------------------------------------------

  // fetch with a timeout; resolves to {status, body} or throws on network failure.
  async function request(url, options) {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), REQUEST_TIMEOUT_MS);
    try {
      const response = await fetch(url, { ...options, signal: controller.signal, cache: 'no-store' });
      let body = null;
      try {
        body = await response.json();
      } catch (_) {
        body = null;
      }
      return { status: response.status, body };
    } finally {
      clearTimeout(timer);
    }
  }

  function errorText(result) {
    if (result.body && typeof result.body.error === 'string' && result.body.error) {
      return result.body.error;
    }
    if (result.status >= 500) return 'server unavailable';
    return 'request failed (HTTP ' + result.status + ')';
  }

  // ---- history ------------------------------------------------------------

  let historyGeneration = 0;
  let historyRetry = null;
  let historyLoadedOnce = false;

  async function loadHistory() {
    const generation = ++historyGeneration;
    clearTimeout(historyRetry);
    const url = '/back/messages?room=' + encodeURIComponent(room) + '&limit=' + HISTORY_LIMIT;
    let problem = null;
    try {
      const result = await request(url, { headers: { Accept: 'application/json' } });
      if (result.status === 200 && result.body && Array.isArray(result.body.messages)) {
        merge(result.body.messages);
        const newest = result.body.messages[result.body.messages.length - 1];
        if (newest && newest.room === room && typeof newest.id === 'string') advanceResume(newest.id);
      } else {
        problem = errorText(result);
      }
    } catch (_) {
      problem = 'server unavailable';
    }
    if (generation !== historyGeneration) return;
    if (problem) {
      els.historyError.textContent = 'Could not load the earlier messages: ' + problem + '. Retrying…';
      els.historyError.hidden = false;
      // Try again while connected; a reconnect also reloads it.
      historyRetry = setTimeout(() => {
        if (socket && socket.connected) loadHistory();
      }, 3000);
    } else {
      els.historyError.hidden = true;
      if (!historyLoadedOnce) {
        historyLoadedOnce = true;
        scrollToBottom();
      }
    }
    els.list.setAttribute('aria-busy', 'false');
    els.empty.hidden = entries.length > 0;
  }

  // ---- connection state ---------------------------------------------------

  const STATE_TEXT = {
    connecting: 'Connecting…',
    connected: 'Connected',
    reconnecting: 'Reconnecting…',
    offline: 'Offline',
    error: 'Cannot join this room',
  };

  function setState(state, detail) {
    els.status.dataset.state = state;
    els.statusText.textContent = detail ? STATE_TEXT[state] + ': ' + detail : STATE_TEXT[state];
    els.retry.hidden = state !== 'offline';
  }

  // ---- Socket.IO ----------------------------------------------------------

  let socket = null;
  let everConnected = false;
  let failedAttempts = 0;

  function disconnectedState() {
    if (!navigator.onLine || failedAttempts >= OFFLINE_AFTER_ATTEMPTS) return 'offline';
    return everConnected ? 'reconnecting' : 'connecting';
  }

  function join() {
    const joiningSocketId = socket.id;
    const since = resumeId;
    const request = since === null ? room : { room, since };
    socket.timeout(JOIN_TIMEOUT_MS).emit('room', request, (err, answer) => {
      if (!socket.connected || socket.id !== joiningSocketId) return;
      if (err) {
        // No answer in time: ask again on this connection.
        join();
        return;
      }
      if (answer && answer.ok) {
        everConnected = true;
        failedAttempts = 0;
        setState('connected');
        // Resumed: the frontend sent everything after `since`. Otherwise,
        // joined first, then read: anything stored before the join is in
        // the history, anything after it arrives as an event.
        if (since === null || !historyLoadedOnce) loadHistory();
      } else if (answer && typeof answer.error === 'string' && /join again shortly/.test(answer.error)) {
        // The frontend cannot resume right now (it is starting, lost Redis,
        // or replayed much to this address): join again shortly, on this
        // connection.
        setTimeout(() => {
          if (socket.connected && socket.id === joiningSocketId) join();
        }, JOIN_RETRY_MS);
      } else {
        setState('error', (answer && answer.error) || 'refused');
      }
    });
  }

  function connect() {
    const options = { path: '/front/socket.io', reconnectionDelayMax: 5000 };
    if (forcePolling) options.transports = ['polling'];
    socket = io(options);

    socket.on('connect', join);
    socket.on('message', (msg) => {
      merge([msg]);
      if (msg && msg.room === room && typeof msg.id === 'string') advanceResume(msg.id);
    });
    socket.on('disconnect', (reason) => {
      setState(disconnectedState());
      if (reason === 'io server disconnect') {
        // The server closed this session; socket.io does not retry by itself.
        setTimeout(() => { if (!socket.connected) socket.connect(); }, 500);
      }
    });
    socket.on('connect_error', () => {
      if (!socket.active) {
        // Refused for good by the server's middleware: try again later.
        setTimeout(() => { if (!socket.connected) socket.connect(); }, 3000);
      }
      setState(disconnectedState());
    });
    socket.io.on('reconnect_attempt', () => setState(disconnectedState()));
    socket.io.on('reconnect_error', () => {
      failedAttempts += 1;
      setState(disconnectedState());
    });
  }

  els.retry.addEventListener('click', () => {
    failedAttempts = 0;
    setState(everConnected ? 'reconnecting' : 'connecting');
    if (socket) {
      socket.disconnect();
      socket.connect();
    }
  });
  window.addEventListener('offline', () => {
    if (socket && !socket.connected) setState('offline');
  });
  window.addEventListener('online', () => {
    if (socket && !socket.connected) {
      failedAttempts = 0;
      setState(disconnectedState());
      socket.disconnect();
      socket.connect();
    }
  });

  // ---- sending ------------------------------------------------------------

  let sending = false;

  function showSendError(text) {
    els.sendError.textContent = text;
    els.sendError.hidden = false;
    els.text.setAttribute('aria-invalid', 'true');
  }

  function clearSendError() {
    els.sendError.hidden = true;
    els.sendError.textContent = '';
    els.text.removeAttribute('aria-invalid');
  }

  async function send() {
    if (sending) return;
    const text = els.text.value;
    if (text.trim() === '') {
      els.text.focus();
      return;
    }
    sending = true;
    els.text.readOnly = true;
    els.send.disabled = true;
    els.composer.setAttribute('aria-busy', 'true');
    clearSendError();
    try {
      const result = await request('/back/message', {
        method: 'POST',
        headers: { 'Content-Type': 'application/json', Accept: 'application/json' },
        body: JSON.stringify({ room, message: text }),
      });
      if (result.status === 201) {
        els.text.value = '';
        updateCounter();
        if (result.body && typeof result.body.id === 'string') {
          mine.add(result.body.id);
          merge([result.body]);
          markMine(result.body.id);
        }
        scrollToBottom();
      } else {
        showSendError('Not sent: ' + errorText(result));
      }
    } catch (_) {
      showSendError('Not sent: server unavailable');
    } finally {
      sending = false;
      els.text.readOnly = false;
      els.send.disabled = false;
      els.composer.removeAttribute('aria-busy');
      els.text.focus();
    }
  }

  function updateCounter() {
    const count = [...els.text.value].length;
    if (count > MAX_CHARS - 500) {
      els.counter.textContent = count + ' / ' + MAX_CHARS;
      els.counter.classList.toggle('over', count > MAX_CHARS);
      els.counter.hidden = false;
    } else {
      els.counter.hidden = true;
    }
  }

  els.composer.addEventListener('submit', (event) => {
    event.preventDefault();
    send();
  });
  els.text.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing && event.keyCode !== 229) {
      event.preventDefault();
      send();
    }
  });
  els.text.addEventListener('input', updateCounter);

  // ---- switching rooms ----------------------------------------------------

  els.roomForm.addEventListener('submit', (event) => {
    event.preventDefault();
    const next = els.roomInput.value.trim();
    if (!ROOM_RE.test(next)) {
      els.roomError.textContent =
        'Room names are 1 to 64 characters: letters, digits, ".", "_" or "-".';
      els.roomError.hidden = false;
      els.roomInput.setAttribute('aria-invalid', 'true');
      els.roomInput.focus();
      return;
    }
    location.assign('/front/' + encodeURIComponent(next) + location.search);
  });
  els.roomInput.addEventListener('input', () => {
    els.roomError.hidden = true;
    els.roomInput.removeAttribute('aria-invalid');
  });

  // ---- start --------------------------------------------------------------

  if (!ROOM_RE.test(room)) {
    els.roomName.textContent = room || '(none)';
    setState('error', 'invalid room name');
    els.text.disabled = true;
    els.send.disabled = true;
    els.list.setAttribute('aria-busy', 'false');
    return;
  }
  els.roomName.textContent = room;
  document.title = '#' + room + ' · Chat';
  els.roomInput.value = '';
  setState('connecting');
  loadHistory();
  if (typeof io !== 'function') {
    setState('offline', 'client library missing');
    return;
  }
  connect();
})();
