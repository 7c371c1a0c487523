//! End-to-end tests, everything over HTTP. Each scenario runs twice: against the distributed
//! deployment (real nats-server and clickhouse-server processes, the three tally services as
//! processes) and against one `tally standalone` process.

#[cfg(target_os = "linux")]
mod allocator;
mod bad_input;
mod browser;
mod cluster;
mod compose;
mod dashboard;
mod drain;
mod faults;
mod grafana;
mod hostile;
mod integrity;
mod limits;
mod loadgen;
mod logs;
mod management;
mod openapi;
mod pipeline;
mod reliability;
mod roles;
mod spread;
mod sql;
mod tokens;
mod visibility;
mod widget;
