//! A component of another world: see `wit/probe.wit`.

wit_bindgen::generate!({
    path: "wit",
    world: "probe",
});

struct Probe;

fn value(row: u32, col: u32) -> f32 {
    (row * 31 + col) as f32 * 0.001
}

impl Guest for Probe {
    fn flat(rows: u32, dim: u32) -> Vec<f32> {
        (0..rows).flat_map(|r| (0..dim).map(move |c| value(r, c))).collect()
    }

    fn nested(rows: u32, dim: u32) -> Vec<Vec<f32>> {
        (0..rows).map(|r| (0..dim).map(|c| value(r, c)).collect()).collect()
    }
}

export!(Probe);
