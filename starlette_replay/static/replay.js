// starlette_replay browser client: placeholder until the browser client lands.
export const PROTOCOL = "replay.v1";
