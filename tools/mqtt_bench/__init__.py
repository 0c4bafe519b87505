"""The MQTT benchmark harness behind tools/bench_mqtt.py: one load generator, two brokers.

Modules: `devices` (active devices, in worker processes), `idle` (thousands of idle TLS
connections over a minimal MQTT codec), `cloud` (the cloud side emulated for Mosquitto),
`targets` (Mosquitto and the medmesh platform behind one interface), `procs` (worker processes,
CPU and memory from /proc), `runner` (the phases, the figures, the table).
"""
