//! Contracts shared across kubemoe processes. The operator, the router and the worker agree on
//! these types; nothing here does I/O.

pub mod deployment;

pub use deployment::{ModelDeployment, ModelDeploymentSpec, ModelDeploymentStatus};
