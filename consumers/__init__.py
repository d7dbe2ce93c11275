"""The other readers of the token stream, each with its own consumer group:
`consumers.audit` (a tamper-evident record of every request and event) and
`consumers.analytics` (latency and throughput figures, on faust-streaming)."""
