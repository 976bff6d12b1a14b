//! `crdgen`: prints the ChatCluster CustomResourceDefinition as YAML.
//!
//! `crds/chatcluster.yaml` and every copy of it are this output; `operator/gen.sh` refreshes
//! them and CI fails when they drift from the Rust types.

use chatcluster_operator::crd::ChatCluster;
use kube::CustomResourceExt;

fn main() -> anyhow::Result<()> {
    let yaml = serde_saphyr::to_string(&ChatCluster::crd())?;
    print!("---\n{yaml}");
    Ok(())
}
