// `echo`: the smallest JavaScript step; returns its input unchanged. Used to
// measure the per-call overhead of a JavaScript component (new store,
// instantiate, call), next to the Rust and Python echo guests.

export function run(input) {
  return input;
}
