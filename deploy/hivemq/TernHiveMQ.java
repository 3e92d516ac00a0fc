// Runs HiveMQ CE embedded, for Tern's tests: `java -cp '<libs>/*' TernHiveMQ.java CONF DATA EXT`.
//
// Java 11+ runs this one file as a program (no build step): the jars come from
// deploy/hivemq/pom.xml through `make setup`, into <cache>/hivemq/libs.
// The broker reads CONF/config.xml, keeps its persistence in DATA and loads extensions
// from EXT. SIGTERM stops it through a shutdown hook, so the file persistence is closed
// cleanly (sessions and queued messages survive); SIGKILL is a crash.
import com.hivemq.embedded.EmbeddedHiveMQ;

import java.nio.file.Files;
import java.nio.file.Path;
import java.util.concurrent.TimeUnit;

public final class TernHiveMQ {

    /** How long a stop may take before the JVM exits anyway (the caller SIGKILLs later still). */
    private static final long STOP_TIMEOUT_S = 20;

    public static void main(String[] args) throws Exception {
        if (args.length != 3) {
            System.err.println("usage: java -cp 'LIBS/*' TernHiveMQ.java CONF_FOLDER DATA_FOLDER EXTENSIONS_FOLDER");
            System.exit(2);
        }
        Path conf = Path.of(args[0]).toAbsolutePath();
        Path data = Path.of(args[1]).toAbsolutePath();
        Path ext = Path.of(args[2]).toAbsolutePath();
        Files.createDirectories(data);
        Files.createDirectories(ext);

        EmbeddedHiveMQ hivemq = EmbeddedHiveMQ.builder()
                .withConfigurationFolder(conf)
                .withDataFolder(data)
                .withExtensionsFolder(ext)
                .build();

        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            System.out.println("TernHiveMQ: stopping");
            try {
                hivemq.stop().get(STOP_TIMEOUT_S, TimeUnit.SECONDS);
                hivemq.close();
                System.out.println("TernHiveMQ: stopped");
            } catch (Exception e) {
                System.out.println("TernHiveMQ: stop failed: " + e);
            }
            System.out.flush();
        }, "tern-hivemq-stop"));

        long t0 = System.nanoTime();
        try {
            hivemq.start().join();
        } catch (Exception e) {
            System.out.println("TernHiveMQ: start failed: " + e);
            e.printStackTrace(System.out);
            System.out.flush();
            // halt, not exit: the shutdown hook would try to stop a broker that never ran.
            Runtime.getRuntime().halt(1);
        }
        // The harness waits for an MQTT handshake; this line is for people reading the log.
        System.out.printf("TernHiveMQ: started in %.2f s%n", (System.nanoTime() - t0) / 1e9);
        System.out.flush();
        // The broker's own threads keep the JVM alive; main has nothing more to do.
        Thread.currentThread().join();
    }
}
