//! End-to-end tests, everything over HTTP. Each scenario runs twice: against the distributed
//! deployment (real nats-server and clickhouse-server processes, the three tally services as
//! processes) and against one `tally standalone` process.

mod bad_input;
mod cluster;
mod faults;
mod integrity;
mod limits;
mod loadgen;
mod management;
mod pipeline;
mod reliability;
mod roles;
mod tokens;
mod visibility;
