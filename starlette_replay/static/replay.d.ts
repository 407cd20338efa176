// Types for replay.js, the starlette_replay browser client (wire protocol replay.v1).

export declare const PROTOCOL: "replay.v1";
export declare const VERSION: string;
/** Close codes after which the client stops instead of reconnecting: 1000, 1008, 1009. */
export declare const STOP_CODES: readonly number[];

/** Turn a relative or http(s) URL into a ws(s) URL, resolved against the page. */
export declare function resolveUrl(url: string): string;

/** A position in a topic: the last offset the client has, in an epoch. */
export interface Cursor {
  epoch: string;
  offset: number;
  /** The `time` of the event at `offset`, when the client received it: sent on resume ("Reused offsets"). */
  time?: number;
}

export type ConnectionState = "connecting" | "open" | "reconnecting" | "closed";

export interface CursorStorage {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
  removeItem(key: string): void;
}

export interface BackoffOptions {
  /** ms; the first retry waits up to this long (default 500). */
  initial?: number;
  /** ms; no retry waits longer (default 30000). */
  max?: number;
  /** growth per failed attempt (default 2). */
  factor?: number;
  /** ms a connection must stay open for the next failure to start from `initial` again (default 10000). */
  resetAfter?: number;
}

export interface Timers {
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
}

export interface ReplayEvent<T = any> {
  topic: string;
  epoch: string;
  offset: number;
  /** The event type given at publish. */
  event: string;
  data: T;
  /** The store's time, ms since the Unix epoch. */
  time: number;
  /** False for events the server replays after `subscribed`, true for the ones after them. */
  live: boolean;
}

export interface SubscribedInfo {
  topic: string;
  epoch: string;
  /** The topic's head when the subscription started. */
  offset: number;
  resumed: boolean;
  recovered: boolean;
  replayed: number;
  /** The cursor the client held before this subscription. */
  previous: Cursor | null;
}

export interface ServerError {
  code:
    | "bad_request"
    | "forbidden"
    | "too_many_subscriptions"
    | "not_subscribed"
    | "rate_limited"
    | "unavailable"
    | "internal"
    | (string & {});
  message: string;
  topic?: string;
  ref?: string | number;
}

export interface SubscribeOptions<T = any> {
  /** Each event once, in offset order, across reconnects and reloads. */
  onEvent?(event: ReplayEvent<T>, sub: Subscription): void;
  onSubscribed?(info: SubscribedInfo, sub: Subscription): void;
  /** resumed && !recovered: events after the cursor were lost; refetch the app's state. */
  onGap?(info: SubscribedInfo, sub: Subscription): void;
  /** `error` frames about this topic. */
  onError?(error: ServerError, sub: Subscription): void;
  /** Start after this cursor (overrides the stored one). */
  cursor?: Cursor | null;
  /** With no cursor: replay this many retained events first. */
  rewind?: number;
}

export interface ClientOptions {
  /** "sse": read the route `replay.sse_route()` serves (one stream for every topic; no acks). Default "websocket". */
  transport?: "websocket" | "sse";
  /** The fetch function the SSE transport uses (tests pass a fake). Default: globalThis.fetch. */
  fetch?: (input: string, init?: any) => Promise<any>;
  /** App subprotocols offered after `replay.v1` (e.g. a token); a function is called before every attempt. */
  protocols?: string[] | (() => string[] | Promise<string[]>);
  /** Where cursors live: default sessionStorage; null keeps them in memory only. */
  storage?: CursorStorage | null;
  /** Key prefix in storage (default "replay:"). */
  storageKey?: string;
  backoff?: BackoffOptions;
  /** The server's heartbeat interval in ms (default 25000); silence for twice it means dead. 0 disables. */
  heartbeatInterval?: number;
  /** ms before a handshake that has not opened is abandoned (default 10000). */
  connectTimeout?: number;
  /** Consecutive failed handshakes before the client gives up (default Infinity). */
  maxHandshakeFailures?: number;
  /** Send batched `ack` frames (default off; interval 1000 ms). */
  ack?: boolean | { interval?: number };
  /** The client's own frames per second, paced by a token bucket (default 50, under the server's 100). */
  maxFrameRate?: number;
  /** Frames the pacer lets through at once (default 100, under the server's burst of 200). */
  frameBurst?: number;
  /** Connect on the first subscribe() (default true). */
  autoConnect?: boolean;
  /** Retry at once on the window's `online` event (default true). */
  reconnectOnOnline?: boolean;
  WebSocket?: new (url: string, protocols: string[]) => WebSocket;
  timers?: Timers;
  random?: () => number;
  now?: () => number;
}

export interface StateDetail {
  state: ConnectionState;
  previous: ConnectionState;
  failures: number;
  code?: number;
  reason?: string;
  attempt?: number;
  delay?: number;
  /** On "closed": true when close() was called, false when the client stopped by itself. */
  byClient?: boolean;
}

export interface ReconnectDetail {
  code: number;
  reason: string;
  attempt: number;
  delay: number;
  failures: number;
}

export interface ClientError {
  kind: "server" | "protocol" | "callback" | "storage" | "closed" | "config";
  message: string;
  code?: string | number;
  reason?: string;
  topic?: string;
  ref?: string | number;
  error?: unknown;
}

export declare class Subscription {
  readonly topic: string;
  /** The last event's position (or where the subscription started), or null before the first `subscribed`. */
  readonly cursor: Cursor | null;
  readonly state: "pending" | "active" | "refused" | "closed";
  /** Leave the topic. The stored cursor is kept. */
  unsubscribe(): void;
}

export declare class ReplayClient {
  constructor(url: string | URL | (() => string | URL), options?: ClientOptions);
  readonly state: ConnectionState;
  /** Consecutive handshakes that failed before `open`. */
  readonly failures: number;
  readonly stats: { connects: number; events: number; duplicates: number; gaps: number; handshakeFailures: number };
  on(type: "state", listener: (detail: StateDetail) => void): () => void;
  on(type: "reconnect", listener: (detail: ReconnectDetail) => void): () => void;
  on(type: "error", listener: (detail: ClientError) => void): () => void;
  connect(): void;
  close(code?: number, reason?: string): void;
  subscribe<T = any>(topic: string, options?: SubscribeOptions<T>): Subscription;
  subscription(topic: string): Subscription | undefined;
}
