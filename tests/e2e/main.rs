//! End-to-end tests: real nats-server and clickhouse-server processes, the three tally
//! services as processes, everything over HTTP.

mod bad_input;
mod cluster;
mod faults;
mod integrity;
mod management;
mod pipeline;
mod tokens;
