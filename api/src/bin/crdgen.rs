//! Prints the katamaran.io CRDs as deploy/ ships them:
//! `cargo run -p katamaran-api --bin katamaran-crdgen > deploy/crd-migration.yaml`.

fn main() -> anyhow::Result<()> {
    print!("{}", katamaran_api::crd::migration_yaml()?);
    Ok(())
}
