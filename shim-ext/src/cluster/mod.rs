//! Migrations as a Kubernetes cluster runs them: pods and nodes resolved through the API
//! server ([`resolve`]), agents reached through `pods/portforward` ([`transport`]), one migration
//! driven between two agents ([`orchestrate`]), and the Migration resource reconciled by the
//! agents ([`controller`]).

pub mod controller;
pub mod orchestrate;
pub mod resolve;
pub mod status;
pub mod transport;
