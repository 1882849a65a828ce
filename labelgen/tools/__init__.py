"""Tools on label sets and teachers, each a command of `labelgen`:
`inspection` (validate, inspect, estimate), `export` (--to axolotl),
`import_logprobs` (labelgen import: logprobs saved from vLLM), `gguf`
(convert-gguf: a GGUF model as an HF teacher) and `demo` (demo-teacher)."""
