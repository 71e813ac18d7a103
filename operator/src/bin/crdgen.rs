//! Writes the ProxiedCluster CRD (generated from the Rust types) to stdout
//! or to the file given; `make crds` keeps `crds/` in step.

fn main() -> anyhow::Result<()> {
    let yaml = tether_operator::crd::crd_yaml()?;
    match std::env::args().nth(1) {
        Some(path) => std::fs::write(&path, yaml)?,
        None => print!("{yaml}"),
    }
    Ok(())
}
