import { z } from "zod";

/** `DIRECTORY_FILE`, read by every service that needs the directory. */
export const directoryFileSetting = () => z.string().trim().min(1).default("/etc/mailpipe/directory.yaml");
