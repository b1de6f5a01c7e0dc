import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    // tests sit beside the code they test (src/*.test.ts); their support code lives in test/
    include: [
      "packages/*/{src,test}/**/*.test.ts",
      "services/*/{src,test}/**/*.test.ts",
      "tests/**/*.test.ts",
    ],
    pool: "forks",
    // two cores: end-to-end files start many processes each, so run at most two files at once
    maxWorkers: 2,
    testTimeout: 60_000,
    hookTimeout: 120_000,
    teardownTimeout: 30_000,
  },
});
