// Rolldown settings merged into `jco componentize --bundle`: the component's
// WIT imports are provided by the host, not by files to bundle.
export default {
  external: [/^realm:/, /^wasi:/],
};
