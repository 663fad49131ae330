// peer-bench generate: generation tokens/s with and without the key/value cache at a few prompt
// lengths (bench/GENERATE.md).
#pragma once

namespace peerd::bench {

int GenerateBench(int argc, char** argv);

}  // namespace peerd::bench
